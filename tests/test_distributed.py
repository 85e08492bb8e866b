"""FSDP2 on 2 CPU processes (torchrun, gloo): the loss curve matches a 1-process run with the same global batch,
and a checkpoint saved by 2 processes resumes in 1 and the reverse (the weights are the plain HF layout; the
optimizer state stays sharded, one file per process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import SUB_ENV, losses, recipe_file, shards, tok_dir  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def _start(nproc: int, recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama2", "pretrain", "--config", str(recipe), "--quiet", f"out_dir={out}",
           "max_steps=4", "save_every=2", "eval_every=2", "global_batch_size=8", "batch_size=2", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    return subprocess.Popen(cmd, env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


def _metrics(run: Path, key: str) -> dict[int, float]:
    from llama2.train.metrics import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been killed right after checkpoint `step`."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.startswith("step-") and int(d.name[5:]) > step:
            shutil.rmtree(d)
    (dst / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")
    return dst


def test_fsdp_two_processes_match_one_and_checkpoints_cross_load(tmp_path, recipe_file):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    _wait(_start(1, recipe_file, one), _start(2, recipe_file, two))
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=0)
    assert _metrics(two, "val_loss") == pytest.approx(_metrics(one, "val_loss"), rel=1e-5)
    assert _metrics(two, "grad_norm") == pytest.approx(_metrics(one, "grad_norm"), rel=1e-4)
    assert a[4] < a[1]

    # the 2-process checkpoint is the ordinary checkpoint directory, with unsharded tensors
    from safetensors.torch import load_file

    from llama2.checkpoint import load_model

    ckpt2 = two / "checkpoints" / "step-000004"
    w1, w2 = load_file(one / "checkpoints/step-000004/model.safetensors"), load_file(ckpt2 / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    cfg = json.loads((ckpt2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert load_model(ckpt2).embed_tokens.weight.shape == w1["model.embed_tokens.weight"].shape
    # the optimizer state was never gathered: each process wrote its own rows, which together are the full state
    full = torch.load(one / "checkpoints/step-000004/optimizer-00000-of-00001.pt", weights_only=True)
    parts = [torch.load(ckpt2 / f"optimizer-0000{r}-of-00002.pt", weights_only=True) for r in (0, 1)]
    for name, entries in full["state"].items():
        want = entries["exp_avg"]["rows"]
        got = [p["state"][name]["exp_avg"] for p in parts]
        assert [g["start"] for g in got] == [0, got[0]["rows"].shape[0]]
        assert 0 < got[0]["rows"].shape[0] < want.shape[0] and got[0]["shape"] == list(want.shape)
        torch.testing.assert_close(torch.cat([g["rows"] for g in got]), want, rtol=1e-4, atol=1e-9, msg=name)

    # 2 processes -> 1 and 1 -> 2: resuming from step 2 continues the same curve
    two_to_one, one_to_two = _rewind(two, tmp_path / "2to1", 2), _rewind(one, tmp_path / "1to2", 2)
    _wait(_start(1, recipe_file, two_to_one), _start(2, recipe_file, one_to_two))
    for run in (two_to_one, one_to_two):
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4]
        for s in (3, 4):
            assert got[s] == pytest.approx(a[s], rel=1e-5, abs=0), (run.name, s)
