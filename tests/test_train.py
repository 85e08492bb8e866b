"""The shared training loop and pretraining: recipes, schedule, optimiser maths against a hand-written loop,
the loss against transformers, data order, clear errors, exact resume after SIGKILL, NaN stop, metrics, plots,
and the tiny recipe end to end on the built-in data."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.model import Transformer
from llama2.train.config import OptimConfig, PretrainRecipe, TrainRecipe
from llama2.recipe import load_recipe

from helpers import ROOT, SUB_ENV, ListBatches, launch_slow, losses, write_token_shards

# ------------------------------------------------------------------------------------------------ helpers
# (write_token_shards, ListBatches, losses and the tok_dir / shards / recipe_file fixtures are shared: helpers.py,
# conftest.py)


def cli(*args: str) -> int:
    from llama2.cli import main

    return main(list(args))


def paper_lr(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """The paper's schedule (section 2.2), written out independently: linear warm-up, then cosine down to 10% of
    the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / (total - warmup - 1)
    return peak * floor + (peak - peak * floor) * (1 + math.cos(math.pi * t)) / 2


# ------------------------------------------------------------------------------------------------ recipes


def test_recipe_overrides_and_errors(tmp_path):
    r = load_recipe(PretrainRecipe, ROOT / "configs/tiny/pretrain.yaml",
                    ["model.dim=96", "optim.lr=2e-3", "out_dir=runs/x", "max_steps=50", "save_every=10",
                     "precision=bf16", "data.build.corpus=[pydoc]"])
    assert (r.model.dim, r.optim.lr, r.out_dir, r.max_steps, r.save_every) == (96, 2e-3, "runs/x", 50, 10)
    assert r.precision == "bf16" and r.data.build.corpus == ["pydoc"]
    assert r.model.build(4096).hidden_dim == 256  # derived again from the new dim: int(8*96/3)=256 -> x32
    bad = {
        "model.dimm=3": ["model.dimm", "allowed keys", "n_layers"],
        "optim.lr=fast": ["optim.lr", "a number"],
        "optim.lr=-1": ["optim.lr", "positive"],
        "precision=fp8": ["precision", "'bf16'"],
        "batch_size=0": ["batch_size", ">= 1"],
        "optim.schedule=step": ["optim.schedule", "'cosine'"],
        "model.preset=9B": ["model.preset", "7B"],
        "colour=red": ["colour", "allowed keys at the top level"],
        "sharding=zero": ["sharding", "'hsdp'"],
        "shard_size=2": ["shard_size", "set sharding=hsdp"],
        "max_steps": ["key=value"],
    }
    for override, words in bad.items():
        with pytest.raises(Llama2Error) as e:
            load_recipe(PretrainRecipe, ROOT / "configs/tiny/pretrain.yaml", [override])
        for w in words:
            assert w in str(e.value), (override, str(e.value))
    with pytest.raises(Llama2Error, match="'shard_size'.*>= 1"):
        load_recipe(PretrainRecipe, ROOT / "configs/tiny/pretrain.yaml", ["sharding=hsdp", "shard_size=0"])
    assert load_recipe(PretrainRecipe, ROOT / "configs/tiny/pretrain.yaml", ["sharding=hsdp"]).shard_size is None
    two = tmp_path / "r.yaml"
    two.write_text("data: {tokenizer: t, sources: [{path: a}, {path: b, weight: 2}]}\n")
    r = load_recipe(PretrainRecipe, two, ["data.sources.1.weight=3.5"])
    assert [s.weight for s in r.data.sources] == [1.0, 3.5]
    with pytest.raises(Llama2Error, match="data.sources.0.weight"):
        load_recipe(PretrainRecipe, two, ["data.sources.0.weight=0"])
    with pytest.raises(Llama2Error, match="not an index"):
        load_recipe(PretrainRecipe, two, ["data.sources.5.weight=1"])


def test_hsdp_needs_torchrun_and_a_shard_size_dividing_the_world(monkeypatch):
    from llama2.train.distributed import DistEnv, with_sharding

    assert with_sharding(DistEnv(), "fsdp") == DistEnv()
    with pytest.raises(Llama2Error, match="needs several processes started by torchrun.*sharding=fsdp"):
        with_sharding(DistEnv(), "hsdp")
    with pytest.raises(Llama2Error, match="6 processes do not split into groups of shard_size 4; set shard_size"):
        with_sharding(DistEnv(0, 6, 0), "hsdp", 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # the default shard_size: torchrun's processes per node
    with pytest.raises(Llama2Error, match="shard_size 4"):
        with_sharding(DistEnv(0, 6, 0), "hsdp")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(Llama2Error, match="LOCAL_WORLD_SIZE .* set shard_size"):
        with_sharding(DistEnv(0, 6, 0), "hsdp")


def test_cli_reports_bad_recipe_in_one_line(capsys, recipe_file):
    assert cli("pretrain", "--config", str(recipe_file), "model.dimm=3") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama2: error:") and "model.dimm" in err and "\n" not in err
    assert cli("pretrain", "--config", "/nonexistent.yaml") == 2
    assert "recipe not found" in capsys.readouterr().err


@pytest.mark.parametrize("size,lr", [("7B", 3e-4), ("13B", 3e-4), ("70B", 1.5e-4)])
def test_paper_recipes(size, lr):
    r = load_recipe(PretrainRecipe, ROOT / f"configs/{size}/pretrain.yaml")
    cfg = r.model.build(32000)
    assert cfg == ModelConfig.from_name(size)
    assert cfg.max_seq_len == 4096 and cfg.vocab_size == 32000
    assert r.global_batch_size * cfg.max_seq_len == 4 * 2**20  # 4M tokens
    for world in (8, 64, 512):  # micro-batch x accumulation x world size is always the global batch
        assert r.batch_size * r.accumulation(world) * world == r.global_batch_size
    o = r.optim
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (lr, 0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (o.schedule, o.warmup_steps, o.min_lr_ratio) == ("cosine", 2000, 0.1)
    assert r.precision == "bf16" and r.activation_checkpointing and r.init_on_meta
    assert abs(r.max_steps * 4 * 2**20 - 2.0e12) < 4.2e6  # 2.0T tokens


def test_schedule_is_the_papers():
    from llama2.train.schedule import lr_at

    o = OptimConfig(lr=3e-4, warmup_steps=2000)
    total = 10000
    for step in (0, 1, 999, 1999, 2000, 2001, 5000, 8000, 9998, 9999):
        assert lr_at(step, o, total) == pytest.approx(paper_lr(step, 3e-4, 2000, total), rel=1e-12)
    assert lr_at(total - 1, o, total) == pytest.approx(3e-5)  # ends at 10% of the peak
    assert lr_at(0, OptimConfig(lr=1.0, warmup_steps=5, warmup_ratio=0.1), 100) == pytest.approx(1 / 10)
    assert lr_at(50, OptimConfig(lr=1.0, warmup_steps=0, schedule="constant"), 100) == 1.0
    assert lr_at(99, OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100) == 0.0


# ------------------------------------------------------------------------------------------------ the loop's maths


def test_trainer_matches_a_hand_written_adamw_loop(tmp_path):
    """Accumulation (2 micro-batches of 2 == one batch of 4), clipping, weight decay only on matrices and the
    warm-up + cosine schedule, against torch.optim.AdamW driven by hand."""
    from llama2.train.loop import Trainer
    from llama2.stages.pretrain import causal_lm_loss

    cfg = ModelConfig.from_name("tiny", max_seq_len=16)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(3, cfg.vocab_size, (4, 17), generator=g) for _ in range(4)]
    optim = OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=0.05, weight_decay=0.1)
    recipe = TrainRecipe(out_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, grad_accum=2, seed=7,
                         optim=optim, device="cpu", precision="fp32")
    trainer = Trainer(recipe, lambda: Transformer(cfg), causal_lm_loss,
                      ListBatches([[d[:2], d[2:]] for d in data]), quiet=True)
    torch.manual_seed(7)
    ref = Transformer(cfg)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), trainer.model.state_dict().values()))
    decay = [p for n, p in ref.named_parameters() if not n.endswith("layernorm.weight") and n != "norm.weight"]
    no_decay = [p for n, p in ref.named_parameters() if n.endswith("layernorm.weight") or n == "norm.weight"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-5, foreach=False)
    result = trainer.fit()
    ref_losses, norms = [], []
    for step, batch in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = paper_lr(step, 1e-2, 2, 4)
        logits = ref(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    assert min(norms) > 0.05  # clipping really happened
    got = losses(tmp_path / "run")
    assert [got[s] for s in (1, 2, 3, 4)] == pytest.approx(ref_losses, rel=1e-5)
    for (name, a), b in zip(trainer.model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert result.step == 4 and result.tokens_seen == 4 * 4 * 16
    groups = trainer.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    assert all(p.ndim == 1 for g in groups if g["weight_decay"] == 0 for p in g["params"])
    assert groups[0]["betas"] == (0.9, 0.95) and groups[0]["eps"] == 1e-5


def test_loss_matches_transformers_with_masked_labels(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llama2.checkpoint import save_model
    from llama2.stages.pretrain import causal_lm_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-gqa", max_seq_len=32)).eval()
    save_model(model, tmp_path / "m")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (3, 20))
    labels = tokens.clone()
    labels[0, :7] = -100  # a prompt: no loss there (SFT)
    labels[2, 12:] = -100
    with torch.no_grad():
        for batch, hf_labels in ((tokens, tokens), ((tokens, labels), labels)):
            out = causal_lm_loss(model, batch)
            want = hf(input_ids=tokens, labels=hf_labels).loss
            assert float(out.loss) == pytest.approx(float(want), rel=1e-5)
        assert int(causal_lm_loss(model, (tokens, labels)).count) == int((labels[:, 1:] != -100).sum())


# ------------------------------------------------------------------------------------------------ data order


def _ramp_source(tmp_path: Path, name: str, lo: int, hi: int, n: int):
    from llama2.data.shards import TokenShards

    stream = np.arange(n) % (hi - lo) + lo
    write_token_shards(tmp_path / name, {"train": [stream], "val": [stream[:300]]}, "0" * 64, 1000, shard_tokens=700)
    return TokenShards(tmp_path / name, "train")


def test_packed_batches_mixture_ranks_and_state(tmp_path):
    from llama2.data.packing import PackedBatches

    a = _ramp_source(tmp_path, "a", 10, 400, 5000)
    b = _ramp_source(tmp_path, "b", 500, 990, 3000)

    def make(**kw):
        return PackedBatches([a, b], [1.0, 3.0], seq_len=15, seed=3, **kw)

    single = make(batch_size=4, accum=2)
    rank0, rank1 = make(batch_size=2, accum=2, rank=0, world_size=2), make(batch_size=2, accum=2, rank=1,
                                                                            world_size=2)
    from_b = total = 0
    for _ in range(200):
        whole = torch.cat(single.next())
        split = torch.cat(rank0.next() + rank1.next())
        assert torch.equal(whole, split)  # the global batch does not depend on the number of processes
        assert whole.shape == (8, 16)
        d = torch.diff(whole, dim=1)  # every row is a contiguous window of its ramp stream
        assert bool(((d == 1) | (d == -389) | (d == -489)).all())
        from_b += int((whole[:, 0] >= 500).sum())
        total += whole.shape[0]
    assert from_b / total == pytest.approx(0.75, abs=0.04)  # sampled by weight 1:3
    state = single.state_dict()
    expect = single.next()
    fresh = make(batch_size=4, accum=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(fresh.next(), expect))
    other_seed = PackedBatches([a, b], [1.0, 3.0], seq_len=15, batch_size=4, accum=2, seed=4)
    assert not torch.equal(torch.cat(other_seed.next()), torch.cat(make(batch_size=4, accum=2).next()))


def test_validation_windows_split_over_processes(tmp_path):
    """Every process gets the same number of batches; the unmasked rows of all processes are exactly the
    windows a single process evaluates."""
    from llama2.data.shards import TokenShards
    from llama2.data.packing import validation_windows

    _ramp_source(tmp_path, "v", 10, 400, 1000)
    val = TokenShards(tmp_path / "v", "val")

    def rows(world: int) -> tuple[list[int], list[list[int]]]:
        counts, kept = [], []
        for rank in range(world):
            batches = validation_windows([val], ["v"], 8, 15, 2, rank, world)["v"]
            counts.append(len(batches))
            for tokens, labels in batches:
                assert tokens.shape == (2, 16)
                kept += [t.tolist() for t, lab in zip(tokens, labels) if (lab != -100).all()]
        return counts, sorted(kept)

    counts1, one = rows(1)
    assert len(one) == 8 and one[0][0] == 10 and one[-1][-1] == 10 + 299 % 390  # spans the whole val split
    for world in (2, 3):
        counts, kept = rows(world)
        assert len(set(counts)) == 1 and kept == one


def test_clear_errors_for_bad_data(tmp_path, shards, tok_dir, recipe_file):
    from llama2.data.packing import PackedBatches
    from llama2.stages.pretrain import build_pretraining

    small = _ramp_source(tmp_path, "small", 10, 400, 100)
    with pytest.raises(Llama2Error, match="larger than all the training data"):
        PackedBatches([small], [1.0], seq_len=32, batch_size=4, accum=1)
    with pytest.raises(Llama2Error, match="fewer than one sequence"):
        PackedBatches([small], [1.0], seq_len=128, batch_size=1, accum=1)

    def build(*overrides):
        recipe = load_recipe(PretrainRecipe, recipe_file, [f"out_dir={tmp_path / 'run'}", "device=cpu", *overrides])
        return build_pretraining(recipe, quiet=True)

    with pytest.raises(Llama2Error, match="does not exist"):
        build(f"data.sources.0.path={tmp_path / 'missing'}")
    write_token_shards(tmp_path / "other", {"train": [np.arange(3, 900)]}, "f" * 64, 1000)
    with pytest.raises(Llama2Error, match="different tokenizer"):
        build(f"data.sources.0.path={tmp_path / 'other'}")
    with pytest.raises(Llama2Error, match="larger than all the training data"):
        build("batch_size=50000")
    with pytest.raises(Llama2Error, match="not a multiple"):
        build("global_batch_size=6", "batch_size=4")


# ------------------------------------------------------------------------------------------------ resume, NaN


def test_sigkill_anywhere_then_resume_gives_the_same_curve(tmp_path, recipe_file):
    base = ["pretrain", "--config", str(recipe_file), "--quiet", "max_steps=16", "save_every=4", "eval_every=4",
            "keep_last=2"]
    ref = launch_slow(base + [f"out_dir={tmp_path / 'ref'}"])
    run = tmp_path / "run"
    args = base + [f"out_dir={run}"]
    # 1) killed in the middle of writing checkpoint 8
    p = launch_slow(args, KILL_IN_SAVE="8")
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert any(c.name.startswith(".tmp-step-000008") for c in (run / "checkpoints").iterdir())
    assert max(losses(run)) == 8  # steps 5..8 were logged before the kill
    # 2) resumed, then killed (SIGKILL) at some point after checkpoint 12
    p = launch_slow(args)
    deadline = time.time() + 300
    while time.time() < deadline and max(losses(run), default=0) < 13:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not any(c.name.startswith(".tmp") for c in (run / "checkpoints").iterdir())
    # 3) resumed to the end
    p = launch_slow(args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    want, got = losses(tmp_path / "ref"), losses(run)
    assert sorted(got) == list(range(1, 17))  # metrics.jsonl truncated to the resumed step, no duplicates
    assert got == want  # bit-exact
    from llama2.train.metrics import read_metrics

    val = [(r["step"], r["val_loss"]) for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")
                   if "val_loss" in r] and [s for s, _ in val] == [4, 8, 12, 16]
    from llama2.checkpoint.runs import list_checkpoints

    assert [s for s, _ in list_checkpoints(run)] == [12, 16]  # keep_last=2
    from safetensors.torch import load_file

    a = load_file(run / "checkpoints/step-000016/model.safetensors")
    b = load_file(tmp_path / "ref/checkpoints/step-000016/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, recipe_file, capsys):
    run = tmp_path / "run"
    code = cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={run}", "optim.lr=1e30",
               "optim.warmup_steps=0", "save_every=1", "max_steps=6")
    err = capsys.readouterr().err
    assert code == 2
    assert "training stopped without saving" in err and "last good checkpoint" in err and "optim.lr" in err
    assert "loss is nan" in err or "loss is inf" in err or "gradient norm is" in err
    from llama2.checkpoint.runs import latest_checkpoint, list_checkpoints

    latest = latest_checkpoint(run)
    bad_step = int(err.split(" at step ")[1].split(":")[0])
    assert [s for s, _ in list_checkpoints(run)][-1] == bad_step - 1 == int(latest.name.split("-")[1])
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(latest / "model.safetensors").values())
    assert max(losses(run)) == bad_step - 1


def test_metrics_and_plot(tmp_path, recipe_file, capsys):
    from llama2.train.metrics import flops_per_token, read_metrics

    run = tmp_path / "run"
    assert cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={run}", "eval_every=3",
               "peak_tflops=1.0") == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    recipe = load_recipe(PretrainRecipe, recipe_file)
    cfg = recipe.model.build(1000)
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"} <= set(r)
        assert r["lr"] == pytest.approx(paper_lr(r["step"] - 1, 3e-3, 2, 6))
        assert r["tokens"] == r["step"] * 4 * 32
        assert r["mfu"] == pytest.approx(flops_per_token(cfg, 32) * r["tokens_per_s"] / 1e12, rel=1e-9)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < math.log(1000) + 0.5
    before = (run / "metrics.jsonl").read_text()
    assert cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={run}") == 0  # finished: no-op
    assert (run / "metrics.jsonl").read_text() == before
    assert cli("plot", str(run), "--out", str(tmp_path / "png")) == 0
    names = {Path(p).name for p in capsys.readouterr().out.split()}
    assert {"loss.png", "lr.png", "tokens_per_s.png", "grad_norm.png", "mfu.png"} <= names
    for n in names:
        data = (tmp_path / "png" / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert cli("plot", str(tmp_path)) == 2


def test_pretraining_rows_shorter_than_the_context(tmp_path, recipe_file):
    """seq_len packs shorter rows (cheaper attention per token) while the checkpoint keeps the model's context."""
    from llama2.checkpoint import load_config
    from llama2.train.metrics import read_metrics

    run = tmp_path / "run"
    assert cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={run}", "seq_len=16") == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["tokens"] for r in records] == [r["step"] * 4 * 16 for r in records]
    assert load_config(run / "checkpoints" / "step-000006").max_seq_len == 32
    with pytest.raises(Llama2Error, match="longer than the model's context"):
        from llama2.stages.pretrain import build_pretraining
        recipe = load_recipe(PretrainRecipe, recipe_file, [f"out_dir={tmp_path / 'long'}", "seq_len=64"])
        build_pretraining(recipe, quiet=True)
    assert cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={tmp_path / 'bad'}", "seq_len=4") == 2


def test_a_share_of_pretraining_steps_trains_rows_as_long_as_the_context(tmp_path, recipe_file):
    """long_rows: about that share of steps reads rows of the whole context (as many tokens, fewer rows), each a
    contiguous window of the source; which steps is fixed by (seed, step), so a resumed sampler agrees; through
    `llama2 pretrain` the tokens per step stay the same; a share outside [0, 1] is refused."""
    from llama2.data.packing import PackedBatches
    from llama2.train.metrics import read_metrics

    class Stream:
        path, num_tokens = "stream", 5000

        def read(self, start: int, n: int) -> np.ndarray:
            return np.arange(start, start + n, dtype=np.int64)

    def sampler() -> PackedBatches:
        return PackedBatches([Stream()], [1.0], 16, 8, 1, seed=3, long_len=64, long_share=0.25)

    batches = sampler()
    shapes = []
    for _ in range(400):
        (rows,) = batches.next()
        shapes.append(tuple(rows.shape))
        assert all(bool((r[1:] - r[:-1] == 1).all()) and int(r[-1]) < Stream.num_tokens for r in rows)
    assert set(shapes) == {(8, 17), (2, 65)} and 60 < shapes.count((2, 65)) < 140
    resumed = sampler()
    resumed.load_state_dict(batches.state_dict() | {"step": 37})
    again = sampler()
    for _ in range(37):
        again.next()
    assert all(torch.equal(resumed.next()[0], again.next()[0]) for _ in range(20))
    plain = PackedBatches([Stream()], [1.0], 16, 8, 1, seed=3, long_len=64, long_share=0.0)
    assert {tuple(plain.next()[0].shape) for _ in range(50)} == {(8, 17)}

    run = tmp_path / "run"
    assert cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={run}", "seq_len=16",
               "long_rows=0.5") == 0
    assert [r["tokens"] for r in read_metrics(run / "metrics.jsonl")] == [r["step"] * 4 * 16 for r in
                                                                         read_metrics(run / "metrics.jsonl")]
    assert cli("pretrain", "--config", str(recipe_file), "--quiet", f"out_dir={tmp_path / 'bad'}",
               "long_rows=1.5") == 2


def test_flops_per_token_counts_every_matmul():
    """6 N + 12 L d T with N = the parameters of transformers' model minus its embedding table."""
    transformers = pytest.importorskip("transformers")
    from llama2.train.metrics import flops_per_token

    cfg = ModelConfig.from_name("tiny-gqa")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        tie_word_embeddings=False))
    n = sum(p.numel() for p in hf.parameters()) - hf.model.embed_tokens.weight.numel()
    assert flops_per_token(cfg, 100) == 6 * n + 12 * cfg.n_layers * cfg.dim * 100


def test_data_build_reads_files_beside_named_sources_and_reserves_pieces(tmp_path):
    """data.build.files joins the corpus (as the `files` source) beside the named ones; data.build.reserved
    strings are single pieces of the trained tokenizer, checked with SentencePiece itself; missing files and a
    dir built from other settings are one clear error each."""
    import json as json_, sentencepiece as spm
    import csv as m1, string as m2, textwrap as m3

    from llama2.stages.pretrain import ensure_built_data

    docs = [Path(m.__file__).read_text().strip() for m in (m1, m2, m3)]
    (tmp_path / "a.jsonl").write_text("".join(json_.dumps({"text": d}) + "\n" for d in docs))
    story = "[INST] What is a Zebrafish? [/INST] A Zebrafish is a small striped fish kept in laboratories."
    (tmp_path / "b.txt").write_text(story)
    reserved = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "Zebrafish"]

    def recipe(*extra: str) -> PretrainRecipe:
        return load_recipe(PretrainRecipe, ROOT / "configs/tiny/pretrain.yaml", [
            "data.build.corpus=[pydoc]", f"data.build.files=[{tmp_path / 'a.jsonl'}, {tmp_path / 'b.txt'}]",
            f"data.build.reserved=[{', '.join(repr(r) for r in reserved)}]", "data.build.vocab_size=600",
            f"data.build.dir={tmp_path / 'built'}", *extra])

    root = ensure_built_data(recipe().data.build, quiet=True)
    stats = json.loads((root / "corpus" / "stats.json").read_text())
    assert stats["sources"] == ["pydoc", "files"] and stats["documents_per_source"]["files"] == 4
    assert stats["inputs"] == [str((tmp_path / n).resolve()) for n in ("a.jsonl", "b.txt")]
    assert stats["documents_per_source"]["pydoc"] > 50  # the named source is still read
    texts = {json.loads(x)["text"] for f in ("train.jsonl", "val.jsonl")
             for x in (root / "corpus" / f).read_text().splitlines()}
    assert set(docs) | {story} <= texts
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer" / "tokenizer.model"))
    pieces = sp.encode(f"<<SYS>>\nBe brief.\n<</SYS>>\n\n{story}", out_type=str)
    assert all(r in pieces for r in reserved) and sp.encode("Zebrafish", out_type=str) == ["▁", "Zebrafish"]
    assert sp.decode(sp.encode(docs[0])) == docs[0]
    assert json.loads((root / "shards" / "manifest.json").read_text())["complete"]
    assert ensure_built_data(recipe().data.build, quiet=True) == root  # built: nothing to do

    with pytest.raises(Llama2Error, match="holds a corpus built from"):  # other files, same dir
        ensure_built_data(recipe(f"data.build.files=[{tmp_path / 'b.txt'}]").data.build, quiet=True)
    with pytest.raises(Llama2Error, match="trained without reserving"):
        ensure_built_data(recipe("data.build.reserved=['[INST]', Salmon]").data.build, quiet=True)
    with pytest.raises(Llama2Error, match=r"data.build.files: .*missing.txt does not exist"):
        ensure_built_data(recipe(f"data.build.files=[{tmp_path / 'missing.txt'}]",
                                 f"data.build.dir={tmp_path / 'other'}").data.build, quiet=True)
    for bad, match in [("data.build.reserved=['two words']", "data.build.reserved.*whitespace"),
                       ("data.build.corpus=[wikipedia]", "data.build.corpus.: unknown corpus source .wikipedia."),
                       ("data.build.files=[]", "data.build.corpus"),
                       ("data.build.corpus=[files]", None)]:
        if match is None:  # only files: the named sources may be left out
            assert recipe(bad, "data.build.corpus=[]").data.build.sources()[0] == ["files"]
            continue
        with pytest.raises(Llama2Error, match=match):
            recipe(bad, "data.build.corpus=[]" if bad == "data.build.files=[]" else "data.build.vocab_size=600")


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_recipe_from_a_fresh_checkout(tmp_path):
    """configs/tiny/pretrain.yaml with no prepared data: builds the default corpus, tokenizer and shards into
    $LLAMA2_CACHE, trains two steps, and writes a checkpoint that transformers opens."""
    env = {**SUB_ENV, "LLAMA2_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "llama2", "pretrain", "--config",
                        str(ROOT / "configs/tiny/pretrain.yaml"), "--quiet", f"out_dir={run}", "max_steps=2",
                        "batch_size=2", "data.eval_sequences=4"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    tiny = load_recipe(PretrainRecipe, ROOT / "configs/tiny/pretrain.yaml", [])
    built = tmp_path / "cache" / tiny.data.build.dir.removeprefix("{cache}/")
    stats = json.loads((built / "corpus" / "stats.json").read_text())
    assert stats["documents_kept"] > 1000
    manifest = json.loads((built / "shards" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 4096 and manifest["complete"]
    ckpt = run / "checkpoints" / "step-000002"
    cfg = json.loads((ckpt / "config.json").read_text())
    want = (tiny.model.dim, tiny.model.n_layers, tiny.data.build.vocab_size)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == want
    assert (ckpt / "tokenizer.model").is_file() and (ckpt / "training_state.pt").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and abs(records[0]["loss"] - math.log(tiny.data.build.vocab_size)) < 1.0
    assert "val_loss" in records[-1]


def _stepped_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=37, multiple_of=16, max_seq_len=8)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for _ in range(2):
        model(torch.randint(0, 37, (2, 8)), targets=torch.randint(0, 37, (2, 8))).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("processes", [3, 1])
def test_optimizer_state_reassembles_from_any_number_of_shards(tmp_path, processes):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from llama2.train import checkpoints as st

    model, opt = _stepped_optimizer(0)
    osd = get_optimizer_state_dict(model, opt)
    # what N FSDP processes write: rows split like torch.chunk (37 -> 13, 13, 11 for 3)
    for rank in range(processes):
        part = {"state": {}, "param_groups": osd["param_groups"]}
        for name, entries in osd["state"].items():
            part["state"][name] = {}
            for key, v in entries.items():
                lo = -(-v.shape[0] // processes) * rank if v.ndim else 0
                hi = min(lo + -(-v.shape[0] // processes), v.shape[0]) if v.ndim else 0
                rows = v[lo:hi] if v.ndim else v
                part["state"][name][key] = {"rows": rows.clone(), "start": lo, "shape": list(v.shape)}
        torch.save(part, tmp_path / st.optimizer_shard_name(rank, processes))
    fresh_model, fresh_opt = _stepped_optimizer(1)
    fresh_model.load_state_dict(model.state_dict())
    loaded = st.load_optimizer_rows(tmp_path, get_optimizer_state_dict(fresh_model, fresh_opt))
    set_optimizer_state_dict(fresh_model, fresh_opt, loaded)
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert want.keys() == got.keys()
    for k in want:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(want[k][key], got[k][key]), (k, key)

    if processes == 3:
        (tmp_path / st.optimizer_shard_name(1, 3)).unlink()
        with pytest.raises(Llama2Error, match="not one complete set"):
            st.load_optimizer_rows(tmp_path, get_optimizer_state_dict(fresh_model, fresh_opt))
    else:
        other = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=41, multiple_of=16, max_seq_len=8))
        other_opt = torch.optim.AdamW(other.parameters(), fused=True)
        with pytest.raises(Llama2Error, match="has shape"):
            st.load_optimizer_rows(tmp_path, get_optimizer_state_dict(other, other_opt))
