"""PPO (paper section 6, RLHF-V5): the reward assembly, GAE and the clipped losses against hand-computed
examples, padding ignored everywhere, KL exactly zero at the start, and tiny runs with a reward a program
computes (the reward rises with bounded KL; a larger beta keeps the policy closer to pi_0; resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llama2.config import ModelConfig
from llama2.errors import Llama2Error

from conftest import fruit_policy  # noqa: E402
from helpers import AScorer, make_ppo_recipe as make_recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)


def test_token_rewards_put_the_score_on_the_last_real_token_and_kl_on_every_real_one():
    from llama2.stages.ppo import token_rewards

    lp = torch.tensor([[-1.0, -2.0, -3.0, 7.0], [-1.0, -1.0, 5.0, 5.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-0.5, -1.0, -9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    rewards, kl = token_rewards(lp, ref, mask, torch.tensor([2.0, -1.0]), beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [-0.5, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0, 0.0], [0.05, -1.0, 0.0, 0.0]]))


def test_gae_by_hand_with_padding():
    from llama2.stages.ppo import gae

    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                   torch.tensor([[True, True, True]]), gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.1 + 0.95 * (0.1 + 0.95 * 0.3), 0.1 + 0.95 * 0.3, 0.3])
    assert ret.tolist()[0] == pytest.approx([a + v for a, v in zip(adv.tolist()[0], [0.5, 0.6, 0.7])])
    # a prompt position first and a pad last: neither contributes (values there are garbage)
    adv, ret = gae(torch.tensor([[5.0, 0.0, 1.0, 999.0]]), torch.tensor([[42.0, 0.5, 0.7, 123.0]]),
                   torch.tensor([[False, True, True, False]]), gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.0, 0.2 + 0.95 * 0.3, 0.3, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.0, 0.2 + 0.95 * 0.3 + 0.5, 1.0, 0.0])
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[True, True]]), gamma=0.5,
                 lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 1.0])


def test_clipped_policy_and_value_losses_by_hand():
    from llama2.stages.ppo import masked_whiten, policy_loss, value_loss

    new = torch.tensor([[-1.0, -0.5, 3.0]])
    old = torch.tensor([[-1.2, -0.5, -7.0]])
    adv = torch.tensor([[1.0, -1.0, 50.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    r0 = math.exp(0.2)
    assert loss.item() == pytest.approx((max(-r0, -1.2) + max(1.0, 1.0)) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(((r0 - 1) - 0.2) / 2, rel=1e-5)
    v = value_loss(torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]]),
                   mask, clip=0.2)
    assert v.item() == pytest.approx(0.5 * (max(1.0, 1.3 ** 2) + max(0.0, 0.3 ** 2)) / 2)
    w = masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), mask)
    assert w.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_pad_rollout_marks_only_response_targets():
    from llama2.stages.ppo import pad_rollout

    tokens, attention, mask = pad_rollout([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], pad_id=0)
    assert tokens.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 3, 0, 0, 0]]
    assert attention.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    # target j is token j + 1: row 0's response tokens 8, 9, 2 are targets 2, 3, 4
    assert mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]


# ---------------------------------------------------------------------------------------------------------------
# Tiny runs with a reward a program computes


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model_path):
    d = tmp_path_factory.mktemp("ppo")
    fruit_policy(d, sp_model_path, CFG, 4)
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Name some fruit, please ({i})."}) + "\n"
                                           for i in range(64)))
    (d / "val.jsonl").write_text("".join(json.dumps({"prompt": f"Name some fruit, please ({i})."}) + "\n"
                                         for i in range(500, 508)))
    return d


def test_kl_is_exactly_zero_while_the_policy_is_the_reference(tmp_path, setup):
    from llama2.stages.ppo import PPO

    run = PPO(make_recipe(setup, tmp_path / "run"), scorer=AScorer(), quiet=True)
    run.trainer.start()
    roll = run.rollout(run.batches.next())
    assert roll.stats["kl"] == 0.0
    padding = ~roll.attention[:, 1:]
    assert roll.mask.sum() > 0 and padding.any() and (roll.old_logprobs[padding] == 0).all()
    assert not (roll.mask & padding).any()  # no action on a pad position


def test_ppo_raises_the_reward_with_bounded_kl_and_beta_limits_it(tmp_path, setup):
    from llama2.stages.ppo import ppo
    from llama2.train.metrics import read_metrics

    results = {}
    for beta in ("0.02", "1.0"):
        ppo(make_recipe(setup, tmp_path / beta, [f"beta={beta}"]), quiet=True, scorer=AScorer())
        results[beta] = [r for r in read_metrics(tmp_path / beta / "metrics.jsonl") if "reward" in r]
    low = results["0.02"]
    first = sum(r["reward"] for r in low[:3]) / 3
    last = sum(r["reward"] for r in low[-3:]) / 3
    assert last > first + 0.05, (first, last)
    assert all(abs(r["kl"]) < 20 for r in low)
    kl_low = sum(r["kl"] for r in low[-5:]) / 5
    kl_high = sum(r["kl"] for r in results["1.0"][-5:]) / 5
    assert kl_high < kl_low
    keys = {"iteration", "reward", "reward_helpfulness", "reward_safety", "kl", "policy_loss", "value_loss",
            "clip_frac", "approx_kl", "entropy", "response_length", "truncated"}
    assert keys <= set(low[-1])
    evals = [r for r in read_metrics(tmp_path / "0.02" / "metrics.jsonl") if "heldout_reward" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert (tmp_path / "0.02" / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = tmp_path / "0.02" / "checkpoints" / "step-000020"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "value" / "model.safetensors").is_file()
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    LlamaForCausalLM.from_pretrained(ckpt)
    LlamaForSequenceClassification.from_pretrained(ckpt / "value")


def test_ppo_resumes_exactly(tmp_path, setup):
    from llama2.stages.ppo import ppo
    from llama2.train.metrics import read_metrics

    ppo(make_recipe(setup, tmp_path / "full", ["max_steps=4", "save_every=2", "eval_every=0"]), quiet=True,
        scorer=AScorer())
    ppo(make_recipe(setup, tmp_path / "cut", ["max_steps=2", "save_every=2", "eval_every=0"]), quiet=True,
        scorer=AScorer())
    resumed = ppo(make_recipe(setup, tmp_path / "cut", ["max_steps=4", "save_every=2", "eval_every=0"]), quiet=True,
                  scorer=AScorer())
    assert resumed.resumed_from == 2
    a = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")}
    for s in (3, 4):
        assert b[s]["reward"] == a[s]["reward"] and b[s]["kl"] == pytest.approx(a[s]["kl"], abs=1e-6)


def test_recipe_errors(tmp_path, setup):
    with pytest.raises(Llama2Error, match="'mini_batch'"):
        make_recipe(setup, tmp_path / "x", ["mini_batch=99"])
    with pytest.raises(Llama2Error, match="'whiten'"):
        make_recipe(setup, tmp_path / "x", ["whiten=median"])
    with pytest.raises(Llama2Error, match="'reward_models'"):
        make_recipe(setup, tmp_path / "x", ["reward_models=halves"])
    from llama2.stages.ppo import ppo

    with pytest.raises(Llama2Error, match="fewer than one batch"):
        ppo(make_recipe(setup, tmp_path / "x", ["batch_size=100", "mini_batch=8"]), quiet=True, scorer=AScorer())


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import AScorer, make_ppo_recipe as make_recipe
from llama2.stages.ppo import ppo
from llama2.train.distributed import shutdown
try:
    ppo(make_recipe(Path({setup!r}), Path(sys.argv[1]), ["max_steps=3", "batch_size=16", "mini_batch=16",
                                                         "eval_every=3", "save_every=3"]), quiet=True,
        scorer=AScorer())
finally:
    shutdown()
"""


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, setup):
    """The same 3 iterations on 1 process and on 2 (FSDP2 over gloo, each process half of every batch, the
    whitening and the logged means over the whole batch; the 2 as two simulated nodes, torchrun --nnodes 2): the same
    rewards, KL and losses."""
    from helpers import one_and_two_processes

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent), setup=str(setup)))
    a, b = one_and_two_processes(tmp_path, [str(script)], [str(script)], nodes=True)
    for s in (1, 2, 3):
        for key in ("reward", "kl", "loss", "policy_loss", "value_loss", "response_length"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-4, abs=1e-5), (s, key)
    assert b[3]["heldout_reward"] == pytest.approx(a[3]["heldout_reward"], abs=1e-6)
    assert (tmp_path / "two" / "checkpoints" / "step-000003" / "value" / "model.safetensors").is_file()


RM_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from torch.distributed.tensor import DTensor
from helpers import make_ppo_recipe as make_recipe
from llama2.stages.ppo import PPO, evaluate_at_start
from llama2.train.distributed import shutdown
setup, rms, mode = Path({setup!r}), Path({rms!r}), sys.argv[1]
try:
    run = PPO(make_recipe(setup, Path(sys.argv[2]), ["max_steps=2", "batch_size=16", "mini_batch=16", "eval_every=2",
                                                     "save_every=0", f"helpfulness_rm={{rms / 'helpfulness'}}",
                                                     f"safety_rm={{rms / 'safety'}}", f"reward_models={{mode}}"]),
              quiet=True)
    sharded = [isinstance(p, DTensor) for rm in (run.scorer.helpfulness_rm, run.scorer.safety_rm)
               for p in rm.model.parameters()]
    assert all(sharded) if run.env.enabled else not any(sharded)
    evaluate_at_start(run)
    run.trainer.fit()
finally:
    shutdown()
"""


@pytest.mark.slow
def test_two_processes_with_sharded_reward_models_match_one_with_whole_ones(tmp_path, setup, sp_model_path):
    """PPO scored by two real reward models (the helpfulness one with the likelihood term): 2 gloo processes with
    `reward_models: sharded` (each RM sharded with FSDP2, each process scoring its own half of the answers) give
    the rewards, KL and losses of one process holding them whole."""
    from helpers import one_and_two_processes, save_scaled_reward_models

    save_scaled_reward_models(CFG, tmp_path / "rms", sp_model_path)
    script = tmp_path / "driver.py"
    script.write_text(RM_DRIVER.format(tests=str(Path(__file__).parent), setup=str(setup), rms=str(tmp_path / "rms")))
    a, b = one_and_two_processes(tmp_path, [str(script), "whole"], [str(script), "sharded"])
    for s in (1, 2):
        for key in ("reward", "reward_helpfulness", "reward_safety"):
            assert b[s][key] == pytest.approx(a[s][key], abs=1e-5), (s, key)
        for key in ("kl", "loss", "policy_loss", "value_loss"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-4, abs=1e-5), (s, key)
    for s in (0, 2):
        assert b[s]["heldout_reward"] == pytest.approx(a[s]["heldout_reward"], abs=1e-5)
    assert all(0.01 < a[s][key] < 0.99 for s in (1, 2) for key in ("reward_helpfulness", "reward_safety"))
    assert a[2]["kl"] > 0 and a[2]["reward"] != a[1]["reward"]
