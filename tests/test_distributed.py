"""FSDP2 on 2 CPU processes (torchrun, gloo): the loss curve matches a 1-process run with the same global batch,
and a checkpoint saved by 2 processes resumes in 1 and the reverse (the weights are the plain HF layout; the
optimizer state stays sharded, one file per process); a stage's frozen reference model is sharded and computes
what the unsharded model does, and a stage's own step, frozen parameters and extra state resume bit-exactly. Two
nodes simulated on this machine (two torchrun launchers, c10d rendezvous on 127.0.0.1) train as one process does,
sharding over all 2 processes (FSDP) or, 2 processes each, within each node and replicating across them (HSDP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SUB_ENV, losses

pytestmark = pytest.mark.slow


def _start(nproc: int, recipe: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.Popen:
    """`llama2 pretrain` in nproc processes (torchrun --standalone), or under the given torchrun launcher."""
    cmd = [sys.executable, "-m", "llama2", "pretrain", "--config", str(recipe), "--quiet", f"out_dir={out}",
           "max_steps=4", "save_every=2", "eval_every=2", "global_batch_size=8", "batch_size=2", "precision=fp32",
           *extra]
    if launcher is not None:
        cmd = [sys.executable, *launcher, *cmd[1:]]
    elif nproc > 1:
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


def test_fsdp_two_processes_match_one_and_checkpoints_cross_load(tmp_path, recipe_file):
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


def test_two_simulated_nodes_match_one_process_and_resume_on_one(tmp_path, recipe_file):
    """`torchrun --nnodes 2` with two launchers on this machine (gloo over loopback; the launch docs/pretraining.md
    gives, HOST being 127.0.0.1) trains the same curve as one process, and its checkpoint resumes on one process."""
    from helpers import two_process_launchers

    one, nodes = tmp_path / "one", tmp_path / "nodes"
    _wait(_start(1, recipe_file, one), *(_start(2, recipe_file, nodes, launcher=x)
                                         for x in two_process_launchers(nodes=True)))
    a, b = losses(one), losses(nodes)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=0)
    assert sorted((nodes / "checkpoints" / "step-000004").glob("optimizer-*")) == [
        nodes / "checkpoints" / "step-000004" / f"optimizer-0000{r}-of-00002.pt" for r in (0, 1)]
    resumed = _rewind(nodes, tmp_path / "nodes-to-one", 2)
    _wait(_start(1, recipe_file, resumed))
    got = losses(resumed)
    for s in (3, 4):
        assert got[s] == pytest.approx(a[s], rel=1e-5, abs=0), s


def test_hsdp_two_nodes_of_two_match_one_process_and_resume_on_one_and_on_fsdp(tmp_path, recipe_file):
    """sharding=hsdp on 2 simulated nodes x 2 processes (the launch docs/pretraining.md gives, HOST 127.0.0.1):
    each node's 2 processes shard the model, the nodes replicate it; the losses and gradient norms (clipped: the
    norm is taken over the shard group, not summed over replicas) are one process's, only the first node writes
    the optimizer shards, and the checkpoint resumes on one process and on 2 processes of plain FSDP."""
    from helpers import two_process_launchers

    one, hsdp = tmp_path / "one", tmp_path / "hsdp"
    clip = "optim.grad_clip=0.5"
    _wait(_start(1, recipe_file, one, clip), *(_start(4, recipe_file, hsdp, clip, "sharding=hsdp", launcher=x)
                                               for x in two_process_launchers(nodes=True, per_node=2)))
    a, b = losses(one), losses(hsdp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=0)
    norms = _metrics(one, "grad_norm")
    assert max(norms.values()) > 0.5 and _metrics(hsdp, "grad_norm") == pytest.approx(norms, rel=1e-4)
    assert _metrics(hsdp, "val_loss") == pytest.approx(_metrics(one, "val_loss"), rel=1e-5)
    ckpt = hsdp / "checkpoints" / "step-000004"
    assert sorted(ckpt.glob("optimizer-*")) == [ckpt / f"optimizer-0000{r}-of-00002.pt" for r in (0, 1)]
    to_one, to_fsdp = _rewind(hsdp, tmp_path / "hsdp-to-one", 2), _rewind(hsdp, tmp_path / "hsdp-to-fsdp", 2)
    _wait(_start(1, recipe_file, to_one, clip), _start(2, recipe_file, to_fsdp, clip))
    for run in (to_one, to_fsdp):
        got = losses(run)
        for s in (3, 4):
            assert got[s] == pytest.approx(a[s], rel=1e-5, abs=0), (run.name, s)


STAGE_WORKER = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama2.model import Transformer
from llama2.train.loop import Trainer
from helpers import TRAINER_CFG as CFG, KLController, ListBatches, lm_loss, ppo_like, token_steps
from helpers import train_recipe as recipe

out = Path(sys.argv[1])
torch.manual_seed(5)
pi0 = Transformer(CFG)
start = {k: v.clone() for k, v in pi0.state_dict().items()}
rank = int(__import__("os").environ["RANK"])
data = [[b[rank::2] for b in step] for step in token_steps(4, batch=8)]  # this process's half of each batch
FROZEN = "layers.0.self_attn.*"


def make(name, crash_at=None, scorer_from=start):
    kl, counters, mine = KLController(), {}, {}
    trainer = Trainer(recipe(out, name, max_steps=4, save_every=2), lambda: Transformer(CFG), lm_loss,
                      ListBatches(data), initial_weights=lambda: start, frozen=[FROZEN],
                      step_fn=ppo_like(kl, counters, crash_at), state={"kl": kl}, quiet=True)
    trainer.add_state("stage", counters)
    trainer.add_state("mine", mine, per_process=True)
    trainer.add_reference_model("pi0", lambda: Transformer(CFG))  # built alike in every run: it draws numbers
    trainer.add_reference_model("scorer", lambda: Transformer(CFG), weights=lambda: scorer_from, save=True)
    return trainer, kl, counters, mine


ref, ref_kl, ref_counters, ref_mine = make("ref")
assert ref.env.world_size == 2
pi = ref.references["pi0"]
assert all(isinstance(p, DTensor) and not p.requires_grad for p in pi.parameters()) and not pi.training
x = token_steps(1)[0][0][:, :-1]
with torch.no_grad():
    torch.testing.assert_close(pi(x), pi0(x), rtol=1e-5, atol=1e-6)
ref_mine.update(rank=rank, value=torch.tensor([10.0 * rank]))
ref.fit()
frozen = {n: p for n, p in ref.model.named_parameters() if n.startswith("layers.0.self_attn.")}
assert frozen and all(not p.requires_grad and p not in ref.optimizer.state for p in frozen.values())
for n, p in frozen.items():
    assert torch.equal(p.full_tensor(), start[n]), n
with torch.no_grad():
    torch.testing.assert_close(pi(x), pi0(x), rtol=1e-5, atol=1e-6)  # the reference did not move

crashed, _, _, crashed_mine = make("run", crash_at=3)
crashed_mine.update(rank=rank, value=torch.tensor([10.0 * rank]))
try:
    crashed.fit()
    raise SystemExit("the run should have crashed")
except RuntimeError as e:
    assert "killed" in str(e)
resumed, kl, counters, mine = make("run", scorer_from={k: torch.zeros_like(v) for k, v in start.items()})
resumed.fit()
assert resumed.resumed_from == 2
with torch.no_grad():  # the saved reference came back from the sharded checkpoint
    torch.testing.assert_close(resumed.references["scorer"](x), pi0(x), rtol=1e-5, atol=1e-6)
assert mine["rank"] == rank and torch.equal(mine["value"], torch.tensor([10.0 * rank]))
assert torch.equal(kl.beta, ref_kl.beta) and counters == ref_counters == {"rollouts": 4}
for (n, a), b in zip(resumed.model.state_dict().items(), ref.model.state_dict().values()):
    assert torch.equal(a.full_tensor(), b.full_tensor()), n
del ref, crashed, resumed, pi, frozen, a, b  # the project's shutdown: collect them, barrier, leave the group
from llama2.train.distributed import shutdown
shutdown()
"""


def test_fsdp_stage_reference_model_frozen_params_and_state_resume(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(STAGE_WORKER)
    env = {**SUB_ENV, "PYTHONPATH": os.pathsep.join([SUB_ENV["PYTHONPATH"], str(Path(__file__).parent)])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and sorted(losses(tmp_path / "ref")) == [1, 2, 3, 4]
    names = {c.name for c in (tmp_path / "run" / "checkpoints" / "step-000004").iterdir()}
    assert {"optimizer-00000-of-00002.pt", "optimizer-00001-of-00002.pt", "training_state.pt"} <= names
    assert "pi0" not in names and (tmp_path / "run" / "checkpoints/step-000004/scorer/config.json").is_file()


RM_WORKER = """
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from llama2.checkpoint import load_checkpoint
from llama2.model import Transformer
from llama2.reward import RewardModel
from llama2.train.distributed import all_gather_object
from llama2.train.loop import Trainer
from helpers import TRAINER_CFG, ListBatches, lm_loss
from helpers import train_recipe as recipe

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
trainer = Trainer(recipe(out, "run"), lambda: Transformer(TRAINER_CFG), lm_loss, ListBatches([]), quiet=True)
g = torch.Generator().manual_seed(0)
rows = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (3, 17, 9, 5, 12, 7, 2, 14)]
starts = [max(1, len(r) // 2) for r in rows]
# each process its own rows, unequal: rank 0 several length buckets, rank 1 one, then none at all
parts = [(slice(0, 7), slice(7, 8)), (slice(0, 3), slice(0, 0))]
with torch.no_grad():
    for name in ("plain", "likelihood"):
        whole = RewardModel(load_checkpoint(out / name).eval(), None, max_batch_tokens=24)
        sharded = RewardModel.load_sharded(out / name, trainer, name, max_batch_tokens=24)
        assert trainer.references[name] is sharded.model and not sharded.model.training
        assert all(isinstance(p, DTensor) and not p.requires_grad for p in sharded.model.parameters())
        calls = []
        sharded.model.register_forward_pre_hook(lambda *_: calls.append(1))
        for part in parts:
            mine = part[rank]
            want = whole.score_ids(rows[mine], starts[mine])
            got = sharded.score_ids(rows[mine], starts[mine])
            assert len(got) == len(want) and torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5,
                                                            atol=1e-5), (name, got, want)
        counts = all_gather_object(len(calls), trainer.env)
        assert counts[0] == counts[1] and counts[0] >= 4, counts  # the rank with fewer batches ran dummies
del trainer, whole, sharded
from llama2.train.distributed import shutdown
shutdown()
"""


def test_sharded_reward_models_score_unequal_shares_as_whole_ones(tmp_path, sp_model_path):
    """RewardModel.load_sharded on 2 gloo processes: an RM with and one without the likelihood term, sharded with
    FSDP2 (each process reading only its rows of the checkpoint), scores each process's own rows (7 against 1, 3
    against none) as the whole model does, every process running the same number of forwards."""
    from llama2.checkpoint import save_model
    from llama2.classifier import SequenceClassifier
    from llama2.config import ModelConfig
    from llama2.tokenizer import Tokenizer

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)
    torch.manual_seed(0)
    for name, likelihood in (("plain", False), ("likelihood", True)):
        rm = SequenceClassifier(cfg, likelihood=likelihood)
        with torch.no_grad():
            rm.score.weight.mul_(100)  # scores of a few units, so that a mismatch would show
        save_model(rm, tmp_path / name, Tokenizer(sp_model_path))
    script = tmp_path / "worker.py"
    script.write_text(RM_WORKER)
    env = {**SUB_ENV, "PYTHONPATH": os.pathsep.join([SUB_ENV["PYTHONPATH"], str(Path(__file__).parent)])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
