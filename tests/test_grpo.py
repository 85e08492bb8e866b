"""GRPO: group-relative advantages against hand-computed values, the loss (three normalisations, with the KL
penalty and clipping) and its gradient against TRL's GRPOTrainer on the same tensors, and tiny runs with a reward a
program computes (the reward rises, resume is exact, the gold judge as the reward, recipe errors)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llama2.config import ModelConfig
from llama2.errors import Llama2Error

from conftest import fruit_policy  # noqa: E402
from helpers import AScorer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)


def test_group_advantages_by_hand():
    from llama2.stages.grpo import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    std = (1 / 3) ** 0.5  # unbiased std of [1, 0, 0, 1]: sqrt(4 x 0.25 / 3)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, 4, "none"), want)
    torch.testing.assert_close(group_advantages(r, 4, "group"),
                               torch.cat([want[:4] / (std + 1e-4), torch.zeros(4, dtype=torch.float64)]))
    batch_std = float(r.std())
    torch.testing.assert_close(group_advantages(r, 4, "batch"), want / (batch_std + 1e-4))
    # under torchrun the batch spans processes: its standard deviation is given
    torch.testing.assert_close(group_advantages(r, 4, "batch", batch_std=torch.tensor(2.0, dtype=torch.float64)),
                               want / (2.0 + 1e-4))
    with pytest.raises(Llama2Error, match="groups of 3"):
        group_advantages(r, 3)


def _trl_loss(loss_type: str, lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, beta: float, eps_low: float, eps_high: float) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss on given per-token log-probabilities (the model call replaced)."""
    from trl import GRPOTrainer

    ident = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x,
                            num_processes=1)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=ident, _metrics=defaultdict(lambda: defaultdict(list)),
        max_completion_length=mask.shape[1])
    B, C = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("ours,trls", [("grpo", "grpo"), ("token", "dapo"), ("dr_grpo", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trls_grpo_trainer(ours, trls, beta):
    from llama2.stages.grpo import grpo_loss

    g = torch.Generator().manual_seed(0)
    B, C = 6, 7
    mask = torch.ones(B, C, dtype=torch.bool)
    for i, n in enumerate((7, 3, 5, 1, 6, 4)):
        mask[i, n:] = False  # answers of different lengths, right-padded
    old = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    ref = old + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3
    base = old + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.4  # ratios both inside and outside the clip
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    grads = []
    losses = []
    for fn in ("ours", "trl"):
        lp = base.clone().requires_grad_(True)
        if fn == "ours":
            loss, stats = grpo_loss(lp, old, ref, adv, mask, clip=0.2, clip_high=0.28, beta=beta, form=ours,
                                    max_new_tokens=C)
        else:
            loss = _trl_loss(trls, lp, old, ref, adv, mask.double(), beta, 0.2, 0.28)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lp.grad * mask)  # padded positions carry no gradient that matters
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert 0 < float(stats["clip_frac"]) < 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model_path):
    d = tmp_path_factory.mktemp("grpo")
    fruit_policy(d, sp_model_path, CFG, 4)
    for name, lo, hi in (("train", 0, 64), ("val", 500, 508)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"Name some fruit, please ({i})."}) + "\n"
                                                 for i in range(lo, hi)))
    return d


def make_recipe(d: Path, out: Path, overrides=()):
    from llama2.recipe import load_recipe
    from llama2.stages.grpo import GRPORecipe

    return load_recipe(GRPORecipe, None, [
        f"base={d / 'policy'}", f"helpfulness_rm={d / 'none'}", f"safety_rm={d / 'none'}", f"out_dir={out}",
        "max_steps=16", "batch_size=8", "group_size=4", "mini_batch=16", "max_new_tokens=10", "beta=0.04",
        "optim.lr=2e-3", f"prompts.path={d / 'train.jsonl'}", f"prompts.val_path={d / 'val.jsonl'}",
        "prompts.held_out=8", "device=cpu", "precision=fp32", "peak_tflops=1", "log_every=1", "eval_every=8",
        "save_every=8", *overrides])


def test_grpo_raises_a_programmatic_reward_and_saves_hf_checkpoints(tmp_path, setup):
    from llama2.stages.grpo import grpo
    from llama2.train.metrics import read_metrics

    grpo(make_recipe(setup, tmp_path / "run"), quiet=True, scorer=AScorer())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    it = [r for r in rows if "reward" in r]
    first, last = (sum(r["reward"] for r in part) / 4 for part in (it[:4], it[-4:]))
    assert last > first + 0.3, (first, last)  # rewards are LOGIT(a share): a clear rise
    assert it[0]["kl"] == 0.0 and it[-1]["kl"] > 0
    assert {"reward", "reward_std", "uniform_groups", "kl", "policy_loss", "clip_frac", "approx_kl", "kl_ref",
            "response_length", "truncated", "time_generate"} <= set(it[-1])
    assert [r["step"] for r in rows if "heldout_reward" in r] == [0, 8, 16]
    assert (tmp_path / "run" / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000016")


def test_grpo_resumes_exactly(tmp_path, setup):
    from llama2.stages.grpo import grpo
    from llama2.train.metrics import read_metrics

    common = ["save_every=2", "eval_every=0"]
    grpo(make_recipe(setup, tmp_path / "full", ["max_steps=4", *common]), quiet=True, scorer=AScorer())
    grpo(make_recipe(setup, tmp_path / "cut", ["max_steps=2", *common]), quiet=True, scorer=AScorer())
    resumed = grpo(make_recipe(setup, tmp_path / "cut", ["max_steps=4", *common]), quiet=True, scorer=AScorer())
    assert resumed.resumed_from == 2
    a = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")}
    for s in (3, 4):
        assert b[s]["reward"] == a[s]["reward"] and b[s]["kl"] == pytest.approx(a[s]["kl"], abs=1e-6)


def test_recipe_errors(tmp_path, setup):
    with pytest.raises(Llama2Error, match="'group_size'"):
        make_recipe(setup, tmp_path / "x", ["group_size=1"])
    with pytest.raises(Llama2Error, match="'mini_batch'"):
        make_recipe(setup, tmp_path / "x", ["mini_batch=33"])
    with pytest.raises(Llama2Error, match="'loss'"):
        make_recipe(setup, tmp_path / "x", ["loss=ppo"])
    with pytest.raises(Llama2Error, match="'helpfulness_rm'"):
        make_recipe(setup, tmp_path / "x", ["helpfulness_rm="])
    from llama2.stages.grpo import grpo

    # the gold judge knows only the world's questions: refused before any rollout, naming the fix
    with pytest.raises(Llama2Error, match="prompts.path: builtin:world/prompts.jsonl"):
        grpo(make_recipe(setup, tmp_path / "x", ["reward=gold"]), quiet=True)


def test_one_update_per_iteration_skips_pi_olds_forward_and_changes_nothing(tmp_path, setup):
    """With one optimiser step per iteration the update's own forward gives pi_old's log-probabilities (the policy
    has not moved yet): the run equals one that computes them in a separate forward."""
    from llama2.stages.grpo import GRPO

    runs = {}
    for skip in (True, False):
        run = GRPO(make_recipe(setup, tmp_path / str(skip), ["max_steps=3", "mini_batch=32", "eval_every=0"]),
                   scorer=AScorer(), quiet=True)
        assert run.one_step
        run.one_step = skip
        run.trainer.start()
        runs[skip] = [run.trainer.train_step() for _ in range(3)]
    for a, b in zip(runs[True], runs[False]):
        for key in ("reward", "loss", "kl", "entropy", "clip_frac", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert runs[True][0]["kl"] == 0.0 and runs[True][-1]["kl"] > 0


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import AScorer
from test_grpo import make_recipe
from llama2.stages.grpo import grpo
from llama2.train.distributed import shutdown
try:
    grpo(make_recipe(Path({setup!r}), Path(sys.argv[1]), ["max_steps=3", "mini_batch=32", "epochs={epochs}",
                                                          "eval_every=3", "save_every=3"]), quiet=True,
         scorer=AScorer())
finally:
    shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_two_gloo_processes_match_one(tmp_path, setup, epochs):
    """The same 3 iterations on 1 process and on 2 (FSDP2 over gloo, each process half of the groups; advantages
    within groups, the logged means over the whole batch): the same rewards, KL and losses, with one update per
    iteration (pi_old from the update's forward) and with two (pi_old's own forward). Mini-batches smaller than
    the batch are drawn by each process from its own share, so they differ from one process's draws."""
    from helpers import one_and_two_processes

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent), setup=str(setup), epochs=epochs))
    a, b = one_and_two_processes(tmp_path, [str(script)], [str(script)])
    for s in (1, 2, 3):
        for key in ("reward", "reward_std", "kl", "entropy", "loss", "response_length"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-4, abs=1e-5), (s, key)
    assert b[3]["heldout_reward"] == pytest.approx(a[3]["heldout_reward"], abs=1e-6)


def test_every_grpo_recipe_loads_with_its_settings():
    from llama2.recipe import load_recipe
    from llama2.stages.grpo import GRPORecipe

    root = Path(__file__).parents[1] / "configs"
    recipes = {size: load_recipe(GRPORecipe, root / size / "grpo.yaml") for size in ("tiny", "world", "7B", "13B",
                                                                                    "70B")}
    assert recipes["world"].reward == "gold" and recipes["tiny"].reward == "rm"
    for size in ("7B", "13B", "70B"):  # DeepSeekMath's beta, lr and clip; 16 answers per prompt
        r = recipes[size]
        assert (r.beta, r.optim.lr, r.clip, r.group_size, r.loss, r.precision) == (0.04, 1e-6, 0.2, 16, "grpo", "bf16")


def test_sigkill_mid_save_then_resume_gives_the_same_run(tmp_path, setup, sp_model_path):
    """`llama2 rlhf grpo` killed (SIGKILL) while writing checkpoint 4, then rerun: it resumes from checkpoint 2 and
    ends with the rewards, KL and losses of an uninterrupted run (the prompt order and every answer's seed are part
    of the saved state)."""
    from helpers import killed_mid_save_and_rerun

    from llama2.checkpoint import save_model
    from llama2.classifier import SequenceClassifier
    from llama2.tokenizer import Tokenizer
    from llama2.train.metrics import read_metrics

    torch.manual_seed(0)
    save_model(SequenceClassifier(CFG), tmp_path / "rm", Tokenizer(sp_model_path))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        f"base: {setup / 'policy'}\nhelpfulness_rm: {tmp_path / 'rm'}\nsafety_rm: {tmp_path / 'rm'}\n"
        f"prompts: {{path: {setup / 'train.jsonl'}, val_path: {setup / 'val.jsonl'}, held_out: 4}}\n"
        "max_steps: 6\nbatch_size: 4\ngroup_size: 2\nmini_batch: 4\nmax_new_tokens: 6\nsave_every: 2\n"
        "eval_every: 0\nlog_every: 1\ndevice: cpu\nprecision: fp32\npeak_tflops: 1\noptim: {lr: 1.0e-3}\n")
    ref, run = killed_mid_save_and_rerun(["rlhf", "grpo", "--config", str(recipe), "--quiet"], tmp_path)
    a, b = ({r["step"]: r for r in read_metrics(d / "metrics.jsonl")} for d in (ref, run))
    assert sorted(b) == sorted(a) == list(range(0, 7))  # step 0: the held-out reward before training
    assert [b[s]["loss"] for s in range(1, 7)] == [a[s]["loss"] for s in range(1, 7)]
    assert [b[s]["reward"] for s in range(1, 7)] == [a[s]["reward"] for s in range(1, 7)]
    assert [b[s]["kl"] for s in range(1, 7)] == pytest.approx([a[s]["kl"] for s in range(1, 7)], abs=1e-7)
