"""The Trainer paths later stages and the big recipes select: bf16 autocast, activation checkpointing,
torch.compile, meta-device init, init_from, fresh / frozen parameters, frozen reference models, a stage's own
step (several optimisation epochs per step) with exact resume, extra checkpointed state, and evaluation
metrics. Each against an oracle written here (a plain model and torch ops, the paper's init, the saved files)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.model import Transformer
from llama2.train.loop import LossOutput, Trainer

from helpers import TRAINER_CFG as CFG, KLController, ListBatches, lm_loss, losses, ppo_like
from helpers import token_steps, train_recipe as recipe


def reference_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from the logits, the textbook way."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def cpu_bf16_flags() -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# ---------------------------------------------------------------------------------------------------------- precision


def test_auto_precision_follows_the_cpu_flags():
    from llama2.train.loop import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_bf16_flags() else None)
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16


def test_bf16_autocast_is_close_to_fp32_and_keeps_fp32_master_weights(tmp_path):
    if not cpu_bf16_flags():
        pytest.skip("this CPU has no native bf16 (no avx512_bf16 / amx_bf16 in /proc/cpuinfo)")
    steps = token_steps(2)
    trainer = Trainer(recipe(tmp_path, precision="auto"), lambda: Transformer(CFG), lm_loss, ListBatches(steps),
                      quiet=True)
    assert trainer.amp_dtype == torch.bfloat16
    ref = Transformer(CFG)
    ref.load_state_dict(trainer.model.state_dict())
    with torch.no_grad():
        want = float(reference_lm_loss(ref, steps[0][0]))
    totals = trainer.backward(steps[0])
    assert totals.loss == pytest.approx(want, rel=2e-2) and totals.loss != pytest.approx(want, rel=1e-7, abs=0)
    trainer.optimizer_step()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


# --------------------------------------------------------------------------------------- recomputation, compile, init


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path, monkeypatch):
    from llama2 import model as model_module

    steps = token_steps(1, batch=2, micro=2)
    trainer = Trainer(recipe(tmp_path, activation_checkpointing=True), lambda: Transformer(CFG), lm_loss,
                      ListBatches(steps), quiet=True)
    calls = []
    feed_forward = model_module.FeedForward.forward

    def counted(self, x):
        if self is trainer.model.layers[0].mlp:
            calls.append(1)
        return feed_forward(self, x)

    monkeypatch.setattr(model_module.FeedForward, "forward", counted)
    ref = Transformer(CFG)
    ref.load_state_dict(trainer.model.state_dict())
    totals = trainer.backward(steps[0])
    assert len(calls) == 4  # 2 micro-batches, each forward once and recomputed once in backward
    want = reference_lm_loss(ref, torch.cat(steps[0]))
    want.backward()
    assert totals.loss == pytest.approx(want.item(), rel=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    steps = token_steps(2)
    curves = []
    for compiled in (False, True):
        trainer = Trainer(recipe(tmp_path, f"c{compiled}", compile=compiled), lambda: Transformer(CFG), lm_loss,
                          ListBatches(steps), quiet=True)
        trainer.fit()
        curves.append(losses(tmp_path / f"c{compiled}"))
    assert sorted(curves[1]) == [1, 2]
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_init_on_meta_initialises_like_init_weights(tmp_path):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=16)
    trainer = Trainer(recipe(tmp_path, init_on_meta=True), lambda: Transformer(cfg), lm_loss,
                      ListBatches(token_steps(2, cfg=cfg)), quiet=True)
    std = 0.02
    for name, p in trainer.model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
        if p.ndim == 1:  # RMSNorm gains
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = std / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        assert float(p.detach().std()) == pytest.approx(want, rel=0.06), name
        assert abs(float(p.detach().mean())) < 4 * want / math.sqrt(p.numel()), name
    trainer.fit()  # and it trains


def test_init_from_starts_from_exactly_the_checkpoint(tmp_path, recipe_file):
    from safetensors.torch import load_file

    from llama2.checkpoint import save_model
    from llama2.stages.pretrain import build_pretraining
    from llama2.train.config import PretrainRecipe
    from llama2.recipe import load_recipe

    torch.manual_seed(123)
    save_model(Transformer(ModelConfig.from_name("tiny", max_seq_len=32, vocab_size=1000)), tmp_path / "init")
    r = load_recipe(PretrainRecipe, recipe_file, [f"out_dir={tmp_path / 'run'}", "device=cpu", "max_steps=1",
                                                  f"init_from={tmp_path / 'init'}"])
    trainer = build_pretraining(r, quiet=True)
    trainer.start()
    saved = load_file(tmp_path / "init" / "model.safetensors")
    got = trainer.model.state_dict()
    assert len(saved) == len(got)
    for name, t in got.items():
        assert torch.equal(t, saved[name if name.startswith("lm_head") else f"model.{name}"]), name


# ------------------------------------------------------------------------------------------- fresh, frozen, reference


class RewardModel(Transformer):
    """A scalar head on the last position's hidden state instead of the LM head (a reward model's shape)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.lm_head
        self.score = nn.Linear(cfg.dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.score(self.hidden(tokens)[:, -1]).squeeze(-1).float()


def ranking_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
    chosen, rejected = model(batch[0]), model(batch[1])
    margin = chosen - rejected
    return LossOutput(-F.logsigmoid(margin).mean(), len(margin), metrics={"accuracy": (margin > 0).float().mean()})


def pair_steps(n: int, seed: int = 0, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, 64, (batch, 12), generator=g), torch.randint(0, 64, (batch, 12), generator=g))]
            for _ in range(n)]


def test_fresh_parameters_must_be_declared(tmp_path):
    torch.manual_seed(0)
    base = Transformer(CFG).state_dict()

    def start(**kw) -> Trainer:
        t = Trainer(recipe(tmp_path), lambda: RewardModel(CFG), ranking_loss, ListBatches(pair_steps(2)),
                    initial_weights=lambda: base, quiet=True, **kw)
        t.start()
        return t

    trainer = start(fresh=["score.*"], discard=["lm_head.weight"])
    for name, t in trainer.model.state_dict().items():
        if name != "score.weight":
            assert torch.equal(t, base[name]), name
    torch.manual_seed(3)  # the recipe's seed: the head keeps the initialisation the build gave it
    assert torch.equal(trainer.model.score.weight, RewardModel(CFG).score.weight)
    with pytest.raises(Llama2Error, match=r"missing \['score.weight'\]"):
        start(discard=["lm_head.weight"])
    with pytest.raises(Llama2Error, match=r"unexpected \['lm_head.weight'\]"):
        start(fresh=["score.weight"])
    with pytest.raises(Llama2Error, match="match no parameter"):
        start(fresh=["scor.weight"], discard=["lm_head.weight"])


def test_frozen_parameters_stay_unchanged_without_optimizer_state(tmp_path):
    frozen = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight")
    trainer = Trainer(recipe(tmp_path, max_steps=3), lambda: Transformer(CFG), lm_loss, ListBatches(token_steps(3)),
                      frozen=["embed_tokens.*", "layers.0.self_attn.*"], trainable=lambda n, p: p.ndim >= 2,
                      quiet=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        frozen_here = name.startswith(("embed_tokens.", "layers.0.self_attn.")) or p.ndim < 2
        assert p.requires_grad is not frozen_here, name
        if frozen_here:
            assert torch.equal(p, before[name]) and p.grad is None and p not in trainer.optimizer.state, name
            assert id(p) not in in_optimizer, name
        else:
            assert not torch.equal(p, before[name]) and p in trainer.optimizer.state, name
    assert all(n in before for n in frozen)
    with pytest.raises(Llama2Error, match="match no parameter"):
        Trainer(recipe(tmp_path, "bad"), lambda: Transformer(CFG), lm_loss, ListBatches([]), frozen=["embed.*"],
                quiet=True)
    # resumes with the frozen parameters' optimizer state absent from the shards
    resumed = Trainer(recipe(tmp_path, max_steps=4), lambda: Transformer(CFG), lm_loss,
                      ListBatches(token_steps(4)), frozen=["embed_tokens.*", "layers.0.self_attn.*"],
                      trainable=lambda n, p: p.ndim >= 2, quiet=True)
    resumed.start()
    assert resumed.step == 3
    assert torch.equal(resumed.model.embed_tokens.weight, before["embed_tokens.weight"])


def test_reference_model_is_frozen_and_not_saved_unless_asked(tmp_path):
    torch.manual_seed(5)
    pi0 = Transformer(CFG)
    sd = {k: v.clone() for k, v in pi0.state_dict().items()}
    trainer = Trainer(recipe(tmp_path), lambda: Transformer(CFG), lm_loss, ListBatches(token_steps(2)),
                      initial_weights=lambda: sd, quiet=True)
    ref = trainer.add_reference_model("pi0", lambda: Transformer(CFG))
    scorer = trainer.add_reference_model("scorer", lambda: Transformer(CFG), weights=lambda: sd, save=True)
    result = trainer.fit()
    x = token_steps(1)[0][0][:, :-1]
    with torch.no_grad():
        want = pi0(x)
        for m in (ref, scorer):
            assert not m.training and not any(p.requires_grad for p in m.parameters())
            assert torch.equal(m(x), want)
            assert all(p.grad is None for p in m.parameters())
    assert not torch.equal(trainer.model.lm_head.weight, sd["lm_head.weight"])  # the policy trained, pi0 did not
    names = {p.name for p in result.checkpoint.iterdir()}
    assert "scorer" in names and "pi0" not in names
    assert (result.checkpoint / "scorer" / "model.safetensors").is_file()
    # a saved reference model comes back from the checkpoint on resume, not from its weights function
    resumed = Trainer(recipe(tmp_path, max_steps=3), lambda: Transformer(CFG), lm_loss, ListBatches(token_steps(3)),
                      initial_weights=lambda: sd, quiet=True)
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    restored = resumed.add_reference_model("scorer", lambda: Transformer(CFG), weights=lambda: zeros, save=True)
    assert torch.equal(restored.lm_head.weight, torch.zeros_like(sd["lm_head.weight"]))
    resumed.start()
    assert resumed.step == 2
    for name, t in restored.state_dict().items():
        assert torch.equal(t, sd[name]), name
    with pytest.raises(Llama2Error, match="before start"):
        resumed.add_reference_model("late", lambda: Transformer(CFG), save=True)


# ------------------------------------------------------------------------------------ a stage's own step, state, eval


def test_custom_step_with_several_epochs_resumes_bit_exactly(tmp_path):
    data = token_steps(4, batch=4)

    def run(name: str, crash_at: int | None = None):
        kl, counters = KLController(), {}
        trainer = Trainer(recipe(tmp_path, name, max_steps=4, save_every=2), lambda: Transformer(CFG), lm_loss,
                          ListBatches(data), step_fn=ppo_like(kl, counters, crash_at), state={"kl": kl},
                          quiet=True)
        trainer.add_state("stage", counters)
        return trainer, kl, counters

    ref, ref_kl, ref_counters = run("ref")
    ref.fit()
    crashed, _, _ = run("run", crash_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        crashed.fit()
    resumed, kl, counters = run("run")
    result = resumed.fit()
    steps_epochs_minibatches = 4 * 3 * 2
    assert result.resumed_from == 2 and resumed.optimizer.state[resumed.params[0]]["step"] == steps_epochs_minibatches
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # bit-exact
    for a, b in zip(resumed.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(kl.beta, ref_kl.beta) and kl.updates == ref_kl.updates == 4
    assert counters == ref_counters == {"rollouts": 4}


def test_state_parts_round_trip_and_are_checked(tmp_path):
    from llama2.train.checkpoints import CheckpointManager, FnState
    from llama2.train.distributed import DistEnv

    holder = {"n": 7}
    kl = KLController()
    kl.update(3.0)
    mgr = CheckpointManager(tmp_path, DistEnv(), keep_last=1)
    mgr.add_state("kl", kl)
    mgr.add_state("plain", {"seen": [1, 2], "w": torch.arange(3.0)})
    mgr.add_state("value", FnState(lambda: holder["n"], lambda v: holder.update(n=v)))
    ckpt = mgr.save(5)
    mgr.save(6)
    assert ckpt.name == "step-000005" and not ckpt.exists()  # keep_last=1
    fresh_kl, plain, got = KLController(), {"stale": 1}, {}
    other = CheckpointManager(tmp_path, DistEnv())
    other.add_state("kl", fresh_kl)
    other.add_state("plain", plain)
    other.add_state("value", FnState(lambda: None, lambda v: got.update(n=v)))
    other.load(other.latest())
    assert torch.equal(fresh_kl.beta, kl.beta) and fresh_kl.updates == 1
    assert plain.keys() == {"seen", "w"} and torch.equal(plain["w"], torch.arange(3.0)) and got == {"n": 7}
    missing = CheckpointManager(tmp_path, DistEnv())
    missing.add_state("kl", KLController())
    with pytest.raises(Llama2Error, match="holds state parts"):
        missing.load(missing.latest())
    bad = CheckpointManager(tmp_path / "b", DistEnv())
    bad.add_state("odd", {"x": object()})
    with pytest.raises(Llama2Error, match="cannot hold"):
        bad.save(1)
    with pytest.raises(Llama2Error, match="state_dict"):
        bad.add_state("nope", 3)


def test_eval_metrics_and_eval_fn_reach_metrics_jsonl(tmp_path):
    from llama2.train.metrics import read_metrics

    val = {"a": pair_steps(2, seed=10)[0] + pair_steps(1, seed=11)[0], "b": pair_steps(1, seed=12, batch=2)[0]}
    trainer = Trainer(recipe(tmp_path), lambda: RewardModel(CFG), ranking_loss, ListBatches(pair_steps(2)),
                      val_batches=lambda: val, eval_fn=lambda t: {"reward_mean": 1.5, "steps_seen": t.step},
                      quiet=True)
    trainer.fit()
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    with torch.no_grad():
        margins = {g: torch.cat([trainer.model(c) - trainer.model(r) for c, r in batches])
                   for g, batches in val.items()}
    every = torch.cat(list(margins.values()))
    assert last["val_loss"] == pytest.approx(float(-F.logsigmoid(every).mean()), rel=1e-5)
    assert last["val_accuracy"] == pytest.approx(float((every > 0).double().mean()), rel=1e-6)
    for g, m in margins.items():
        assert last[f"val_accuracy/{g}"] == pytest.approx(float((m > 0).double().mean()), rel=1e-6)
        assert last[f"val_loss/{g}"] == pytest.approx(float(-F.logsigmoid(m).mean()), rel=1e-5)
    assert "val_ppl" not in last  # not a language-model loss
    assert last["reward_mean"] == 1.5 and last["steps_seen"] == 2
    assert "accuracy" in last  # the training step's metric
