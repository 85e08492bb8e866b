"""The sandbox: programs that loop, allocate without bound, fork, write outside their directory, open sockets or
leave processes behind are contained and scored as failures, and the machine is unharmed (no process left with
the sandbox's uid, no file outside created). Every layer is also tested with the Python guard off, so the
operating-system limits are shown to hold on their own."""

from __future__ import annotations

import os
import time

import pytest

from llama2.errors import Llama2Error
from llama2.eval.sandbox import Limits, isolation, run_program, run_programs, uid_pids

SHORT = Limits(cpu_s=2, wall_s=30, memory_mb=256)  # a long wall clock: interpreter start-up is slow on a busy CI box


def no_leftovers(result) -> None:
    if result.uid is not None:
        assert uid_pids(result.uid) == []


def os_layers() -> bool:
    iso = isolation()
    return iso.namespaces or iso.root


def test_a_program_passes_fails_and_exits_with_its_code():
    assert run_program("print(6 * 7)", SHORT).stdout == "42\n"
    assert run_program("print(6 * 7)", SHORT).status == "passed"
    r = run_program("assert 1 == 2, 'nope'", SHORT)
    assert (r.status, r.returncode, r.reason()) == ("failed", 1, "AssertionError: nope")
    r = run_program("import sys; sys.exit(3)", SHORT)
    assert (r.status, r.returncode) == ("failed", 3)
    assert run_program("def f(:\n", SHORT).reason().startswith("SyntaxError")


def test_its_own_directory_scrubbed_environment_and_no_project_on_the_path(tmp_path):
    src = ("import os, sys, json\nopen('scratch.txt', 'w').write('ok')\n"
           "print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ), 'path': sys.path, "
           "'files': sorted(os.listdir('.'))}))\n"
           "try:\n    import llama2\n    print('IMPORTED')\nexcept ImportError:\n    pass\n")
    r = run_program(src, SHORT)
    assert r.status == "passed", r.stderr
    import json

    out = json.loads(r.stdout.splitlines()[0])
    assert "IMPORTED" not in r.stdout
    assert out["files"] == ["program.py", "scratch.txt"]
    assert set(out["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE"}
    assert out["env"]["HOME"] == out["cwd"] and "site-packages" not in " ".join(out["path"])
    assert not os.path.exists(out["cwd"])  # deleted after


def test_an_endless_loop_times_out_on_the_cpu_limit_and_the_wall_clock():
    t = time.monotonic()
    r = run_program("while True:\n    pass\n", Limits(cpu_s=1, wall_s=6))
    assert r.status == "timeout" and r.reason() == "timed out"
    assert time.monotonic() - t < 6
    r = run_program("import time\ntime.sleep(60)\n", Limits(cpu_s=1, wall_s=1.5))  # no CPU used: the wall clock
    assert r.status == "timeout" and r.wall_s < 5
    no_leftovers(r)


@pytest.mark.parametrize("guard", [True, False])
def test_unbounded_allocation_is_a_memory_failure(guard):
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", SHORT, guard=guard)
    assert r.status == "memory" and not r.passed


def test_a_fork_bomb_is_stopped_and_leaves_no_process():
    r = run_program("import os\nwhile True:\n    os.fork()\n", SHORT)
    assert r.status == "failed" and "not allowed" in r.reason()
    if not os_layers():
        pytest.skip("no unprivileged uid or namespaces here: only the guard stops fork")
    # the guard bypassed: the process limit (RLIMIT_NPROC of a dedicated uid) and the PID namespace hold
    r = run_program("import posix\nwhile True:\n    posix.fork()\n", SHORT, guard=False)
    assert r.status in ("failed", "timeout") and not r.passed
    no_leftovers(r)


def test_a_child_escaping_the_process_group_is_killed_at_the_end():
    if not os_layers():
        pytest.skip("no unprivileged uid or namespaces here")
    src = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n"
           "print(os.getpid())\n")
    r = run_program(src, SHORT, guard=False)
    assert r.status == "passed"
    no_leftovers(r)
    import subprocess

    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "time.sleep(120)" not in ps


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    src = f"open({str(target)!r}, 'w').write('pwned')\n"
    r = run_program(src, SHORT)
    assert r.status == "failed" and "outside the program's directory" in r.reason()
    assert not target.exists()
    r = run_program(f"import os\nos.remove({str(tmp_path)!r} + '/x')\n", SHORT)
    assert r.status == "failed" and "not allowed" in r.reason()
    if not os_layers():
        pytest.skip("no unprivileged uid or namespaces here: only the guard stops writes")
    r = run_program(src, SHORT, guard=False)  # read-only /tmp in the mount namespace, or no permission
    assert r.status == "failed" and not target.exists()
    project_file = os.path.join(os.path.dirname(__file__), "sandbox-was-here.txt")
    r = run_program(f"open({project_file!r}, 'w').write('pwned')\n", SHORT, guard=False)
    if isolation().root:  # an unprivileged uid cannot write into root's tree
        assert r.status == "failed" and not os.path.exists(project_file)


def test_opening_a_socket_is_refused():
    src = "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    r = run_program(src, SHORT)
    assert r.status == "failed" and "not allowed" in r.reason()
    r = run_program("import socket\nsocket.socket()\n", SHORT)
    assert r.status == "failed" and "network access is not allowed" in r.reason()
    if not isolation().namespaces:
        pytest.skip("no network namespace here: only the guard stops sockets")
    src = "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 53))\n"
    r = run_program(src, SHORT, guard=False)
    assert r.status == "failed" and "unreachable" in r.reason()


def test_stderr_and_stdout_are_truncated():
    r = run_program("import sys\nsys.stderr.write('e' * 100000)\nprint('o' * 100000)\n",
                    Limits(cpu_s=2, stderr_chars=500, stdout_chars=300))
    assert r.status == "passed"
    assert len(r.stderr) < 600 and len(r.stdout) < 400 and "truncated" in r.stderr


def test_many_programs_in_parallel_keep_their_order():
    sources = [f"print({i})" if i % 3 else f"raise ValueError({i})" for i in range(9)]
    results = run_programs(sources, SHORT, workers=3, progress=False)
    for i, r in enumerate(results):
        if i % 3:
            assert r.passed and r.stdout.strip() == str(i)
        else:
            assert r.status == "failed" and r.reason() == f"ValueError: {i}"
    uids = {r.uid for r in results}
    assert None in uids or len(uids) >= 1


def test_bad_limits_are_clear_errors():
    with pytest.raises(Llama2Error, match="positive"):
        Limits(cpu_s=0)
    with pytest.raises(Llama2Error, match="too small"):
        Limits(memory_mb=1)
    with pytest.raises(Llama2Error, match="workers"):
        run_programs(["pass"], workers=0)
