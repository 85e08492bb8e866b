"""Rejection sampling (paper section 6): the combined reward and its whitening against the paper's formulas on
hand-made numbers, best-of-K selection and pooling on a fake scorer, and the loop end to end with a reward a
program computes (resume, pooling, the temperature sweep, Figure 7)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.reward import CombinedScores

from conftest import FRUIT, fruit_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)


# ---------------------------------------------------------------------------------------------------------------
# The combined reward, WHITEN(LOGIT(.))


def test_combined_reward_follows_the_paper_including_the_threshold_edges():
    from llama2.reward import combine_rewards

    r_h = [0.9, 0.9, 0.9, 0.9, 0.2, 0.8]
    r_s = [0.1, 0.15, 0.1499, 0.6, 0.7, 0.05]
    tags = [False, False, False, True, False, True]
    # R_s < 0.15 -> R_s; exactly 0.15 -> R_h; a safety prompt -> R_s whatever its value
    assert combine_rewards(r_h, r_s, tags) == [0.1, 0.9, 0.1499, 0.6, 0.2, 0.05]
    assert combine_rewards([0.9], [0.3], [False], threshold=0.5) == [0.3]
    with pytest.raises(Llama2Error, match="one of each"):
        combine_rewards([0.1], [0.2, 0.3], [False])


def test_whiten_logit_batch_and_running_statistics():
    from llama2.reward import Whitener, logit

    assert logit(0.5) == 0.0 and logit(0.9) == pytest.approx(math.log(9))
    assert math.isfinite(logit(1.0)) and logit(1.0) == pytest.approx(math.log((1 - 1e-6) / 1e-6))
    xs = [logit(p) for p in (0.1, 0.4, 0.7, 0.95)]
    w = Whitener("batch")(xs)
    mean, std = statistics.fmean(xs), statistics.pstdev(xs)
    assert w == pytest.approx([(x - mean) / std for x in xs], rel=1e-6)
    assert statistics.fmean(w) == pytest.approx(0, abs=1e-9) and statistics.pstdev(w) == pytest.approx(1, rel=1e-6)
    running = Whitener("running")
    running(xs[:2])
    second = running(xs[2:])  # statistics of all four values seen so far
    assert second == pytest.approx([(x - mean) / std for x in xs[2:]], rel=1e-6)
    restored = Whitener("running")
    restored.load_state_dict(running.state_dict())
    assert restored([0.3]) == running([0.3])
    with pytest.raises(Llama2Error, match="batch' or 'running"):
        Whitener("median")


# ---------------------------------------------------------------------------------------------------------------
# Best-of-K and pooling on a fake scorer


def test_best_of_k_on_nested_subsets_and_pooling():
    from llama2.data.prompts import PromptItem
    from llama2.stages.rejection import best_of_k, pool_selection, reward_by_k, select_best

    rewards = [[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.6]]
    assert best_of_k(rewards, 1) == [0.1, 0.4] and best_of_k(rewards, 3) == [0.5, 0.8]
    best, median = reward_by_k(rewards)
    assert best == pytest.approx({1: 0.25, 2: 0.45, 3: 0.65, 4: 0.85})
    assert median[2] == pytest.approx((0.3 + 0.3) / 2) and median[4] == pytest.approx((0.4 + 0.5) / 2)
    prompts = [PromptItem([{"role": "user", "content": "a"}]), PromptItem([{"role": "user", "content": "b"}])]
    texts = [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]]
    v1 = select_best(prompts, texts, rewards, 1)
    assert [b.text for b in v1.values()] == ["a3", "b2"]
    v2 = select_best(prompts, [["A0"], ["B0"]], [[0.5], [0.95]], 2)  # a regression on "a", a gain on "b"
    assert sorted(b.text for b in pool_selection([v1, v2], "latest")) == ["A0", "B0"]
    pooled = {b.prompt.text: (b.text, b.iteration) for b in pool_selection([v1, v2], "all")}
    assert pooled == {"a": ("a3", 1), "b": ("B0", 2)}


# ---------------------------------------------------------------------------------------------------------------
# The loop, with a reward a program computes


def letter_share(text: str, letter: str = "a") -> float:
    """The share of `letter` among the answer's letters (0 for an empty answer)."""
    letters = [c for c in text.lower() if c.isalpha()]
    return letters.count(letter) / len(letters) if letters else 0.0


class LetterScorer:
    """R_h = R_s = letter_share (no safety prompt is tagged)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses, is_safety):
        self.calls += len(responses)
        r = [letter_share(t) for t in responses]
        return CombinedScores(r, r, r)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model_path):
    d = tmp_path_factory.mktemp("rs")
    fruit_policy(d, sp_model_path, CFG, 5)
    topics = ["lists", "files", "loops", "sets", "dicts", "strings", "bytes", "tuples", "classes", "modules",
              "threads", "sockets", "queues", "paths", "dates", "numbers", "errors", "tests", "types", "imports"]
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in topics))
    (d / "val.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What are {t}?"}]})
                                         + "\n" for t in ("lists", "files", "graphs", "trees")))
    (d / "ft.yaml").write_text("max_steps: null\nepochs: 8\nbatch_size: 4\nmax_seq_len: 96\nprecision: fp32\n"
                               "optim: {lr: 1.0e-2, warmup_steps: 1, schedule: constant}\nlog_every: 5\n"
                               "eval_every: 0\nsave_every: 0\npeak_tflops: 1\nkeep_last: 1\n")
    return d


def make_recipe(d: Path, out: Path, overrides=()):
    from llama2.stages.rejection import RejectionRecipe
    from llama2.recipe import load_recipe

    return load_recipe(RejectionRecipe, None, [f"base={d / 'policy'}", f"helpfulness_rm={d / 'none'}",
                                               f"safety_rm={d / 'none'}", f"out_dir={out}", "iterations=1",
                                               "samples_per_prompt=8", "max_new_tokens=12", "batch_prompts=5",
                                               f"prompts.path={d / 'train.jsonl'}",
                                               f"prompts.val_path={d / 'val.jsonl'}", "prompts.held_out=4",
                                               f"finetune.recipe={d / 'ft.yaml'}", "device=cpu", *overrides])


def test_one_iteration_raises_the_held_out_reward_and_best_of_k_grows(tmp_path, setup):
    from llama2.stages.rejection import rejection_sampling
    from llama2.train.metrics import read_metrics

    result = rejection_sampling(make_recipe(setup, tmp_path / "run"), quiet=True, scorer=LetterScorer())
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1]
    v0, v1 = records
    by_k = {int(k): v for k, v in v1["reward_by_k"].items()}
    assert sorted(by_k) == list(range(1, 9))
    assert all(by_k[k + 1] >= by_k[k] for k in range(1, 8)) and by_k[8] > by_k[1] + 0.05
    # the selection is each prompt's best sample, scored by the program
    samples = [json.loads(x) for x in (tmp_path / "run" / "iter-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and all(len(s["samples"]) == 8 for s in samples)
    assert all(s["reward"] == pytest.approx([letter_share(t) for t in s["samples"]]) for s in samples)
    selected = [json.loads(x) for x in (tmp_path / "run" / "iter-1" / "selected.jsonl").read_text().splitlines()]
    assert [x["reward"] for x in selected] == pytest.approx([max(s["reward"]) for s in samples])
    assert v1["heldout_reward"] > v0["heldout_reward"] + 0.05  # fine-tuning on the best raised the greedy reward
    answers = json.loads((tmp_path / "run" / "iter-1" / "heldout_answers.json").read_text())
    assert v1["heldout_reward"] == pytest.approx(statistics.fmean(letter_share(a) for a in answers))
    assert result.policy.parent.parent == tmp_path / "run" / "iter-1" / "sft"
    assert (tmp_path / "run" / "reward_by_k.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_after_the_last_finished_batch_and_pools(tmp_path, setup, monkeypatch):
    """A run killed while sampling continues from its last finished batch (the finished prompts are not sampled
    again); a second iteration with pool=all keeps each prompt's best sample over both iterations."""
    from llama2.stages import rejection
    from llama2.stages.rejection import rejection_sampling

    scorer = LetterScorer()
    calls = {"n": 0}
    real = rejection.RejectionSampling.sample

    def dying(self, policy, prompts, iteration, temperature, k, path, desc):
        if path is not None:
            calls["n"] += 1
            if calls["n"] == 1:  # the first training sampling: die after two batches were written
                original = rejection.atomic_write_text
                written = {"n": 0}

                def counting(p, text):
                    original(p, text)
                    if Path(p) == path:
                        written["n"] += 1
                        if written["n"] == 2:
                            raise KeyboardInterrupt

                monkeypatch.setattr(rejection, "atomic_write_text", counting)
        return real(self, policy, prompts, iteration, temperature, k, path, desc)

    monkeypatch.setattr(rejection.RejectionSampling, "sample", dying)
    recipe = make_recipe(setup, tmp_path / "run", ["iterations=2", "pool=all"])
    with pytest.raises(KeyboardInterrupt):
        rejection_sampling(recipe, quiet=True, scorer=scorer)
    monkeypatch.undo()
    lines = (tmp_path / "run" / "iter-1" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 10  # two batches of 5 prompts
    before = scorer.calls
    result = rejection_sampling(make_recipe(setup, tmp_path / "run", ["iterations=2", "pool=all"]), quiet=True,
                                scorer=scorer)
    assert result.iterations == 2
    # resumed: 4 held-out (V0 eval was done) ... the 10 remaining prompts x 8, then V1 eval, V2 sampling and eval
    assert scorer.calls - before == 10 * 8 + 4 + 20 * 8 + 4
    first = [json.loads(x) for x in lines]
    again = [json.loads(x) for x in (tmp_path / "run" / "iter-1" / "samples.jsonl").read_text().splitlines()]
    assert again[:10] == first
    v1 = {json.dumps(s["prompt"]): max(s["reward"]) for s in again}
    v2 = {json.dumps(json.loads(x)["prompt"]): max(json.loads(x)["reward"])
          for x in (tmp_path / "run" / "iter-2" / "samples.jsonl").read_text().splitlines()}
    selected = [json.loads(x) for x in (tmp_path / "run" / "iter-2" / "selected.jsonl").read_text().splitlines()]
    for s in selected:
        key = json.dumps(s["messages"])
        assert s["reward"] == pytest.approx(max(v1[key], v2[key]))
    assert {s["iteration"] for s in selected} <= {1, 2}


def test_temperature_sweep_picks_the_best_of_k(tmp_path, setup):
    from llama2.stages.rejection import rejection_sampling
    from llama2.train.metrics import read_metrics

    rejection_sampling(make_recipe(setup, tmp_path / "run", ["temperature=sweep", "sweep.temperatures=[0.5,1.5]",
                                                              "sweep.prompts=3", "max_prompts=5"]),
                       quiet=True, scorer=LetterScorer())
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    sweep = rec["temperature_sweep"]
    assert set(sweep) == {"0.5", "1.5"} and rec["temperature"] == float(max(sweep, key=sweep.get))


def test_recipe_errors(tmp_path, setup):
    from llama2.stages.rejection import rejection_sampling

    with pytest.raises(Llama2Error, match="'pool'"):
        make_recipe(setup, tmp_path / "x", ["pool=best"])
    with pytest.raises(Llama2Error, match="'temperature'"):
        make_recipe(setup, tmp_path / "x", ["temperature=hot"])
    with pytest.raises(Llama2Error, match="samples_per_promptt"):
        make_recipe(setup, tmp_path / "x", ["samples_per_promptt=3"])
    with pytest.raises(Llama2Error, match="helpfulness RM .* does not exist"):
        rejection_sampling(make_recipe(setup, tmp_path / "x"), quiet=True)
    with pytest.raises(Llama2Error, match="optim.lrr"):
        rejection_sampling(make_recipe(setup, tmp_path / "x", ["finetune.overrides=[optim.lrr=1]"]), quiet=True,
                           scorer=LetterScorer())


def test_a_sampler_checkpoint_supplies_the_samples(tmp_path, setup):
    """Distillation: with `sampler`, every iteration samples from that checkpoint (here the random model, which
    never says fruit), not from the policy being trained."""
    from llama2.stages.rejection import rejection_sampling

    rejection_sampling(make_recipe(setup, tmp_path / "own", ["max_prompts=5"]), quiet=True, scorer=LetterScorer())
    rejection_sampling(make_recipe(setup, tmp_path / "distil", ["max_prompts=5", f"sampler={setup / 'random'}"]),
                       quiet=True, scorer=LetterScorer())

    def samples(run):
        lines = (run / "iter-1" / "samples.jsonl").read_text().splitlines()
        return [t for x in lines for t in json.loads(x)["samples"]]

    def fruity(texts):  # the share of samples with a fruit's first three letters in them
        return sum(any(f[:3] in t for f in FRUIT) for t in texts) / len(texts)

    assert fruity(samples(tmp_path / "own")) > fruity(samples(tmp_path / "distil")) + 0.3


def test_rollout_quantize_samples_from_int8_layers(tmp_path, setup, monkeypatch):
    """rollout_quantize=int8 builds the rollout Generator with quantize="int8" (quantize_int8 runs on the policy
    once per sampling call, and the samples are those of the int8 model, reproduced here by hand); the default
    leaves the weights as they are; a bad value is refused when the recipe loads."""
    from llama2.inference import quantize as q
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.stages.rejection import RejectionSampling

    calls = []
    real = q.quantize_int8
    monkeypatch.setattr(q, "quantize_int8", lambda model: calls.append(model) or real(model))

    def samples(overrides):
        rs = RejectionSampling(make_recipe(setup, tmp_path / overrides[0].replace("=", "-"),
                                           [*overrides, "max_prompts=2"]), scorer=LetterScorer(), quiet=True)
        return rs, rs.sample(rs.base, rs.train_prompts, 1, 1.0, 2, None, "test")

    rs, plain = samples(["rollout_quantize=none"])
    assert calls == []
    rs, quantized = samples(["rollout_quantize=int8"])
    assert len(calls) == 1
    # the same draws from the int8 model directly: the recipe's seeds and prompts (first prompt, first sample)
    from llama2.chat import encode_dialog
    from llama2.data.prompts import prompt_key, sample_seed

    model, tok = rs._load_policy(rs.base)
    p = rs.train_prompts[0]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, truncate=True,
                            seed=sample_seed(0, 1, prompt_key(p), 0))
    want = Generator(model, tok, quantize="int8").generate([encode_dialog(tok, p.messages)], params)[0]
    assert quantized[0]["samples"][0] == want.text.strip()
    assert [s["samples"] for s in plain] != [s["samples"] for s in quantized]
    with pytest.raises(Llama2Error, match="rollout_quantize"):
        make_recipe(setup, tmp_path / "x", ["rollout_quantize=int4"])


RS_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from torch.distributed.tensor import DTensor
from test_rejection import make_recipe
from llama2.stages.rejection import RejectionSampling
from llama2.train.distributed import shutdown
setup, rms, mode = Path({setup!r}), Path({rms!r}), sys.argv[1]
try:
    run = RejectionSampling(make_recipe(setup, Path(sys.argv[2]), [
        f"helpfulness_rm={{rms / 'helpfulness'}}", f"safety_rm={{rms / 'safety'}}", f"reward_models={{mode}}",
        "max_prompts=6", "samples_per_prompt=4", "batch_prompts=4", "max_steps=4",
        f"finetune.recipe={{rms.parent / 'ft.yaml'}}"]), quiet=True)
    sharded = [isinstance(p, DTensor) for rm in (run.scorer.helpfulness_rm, run.scorer.safety_rm)
               for p in rm.model.parameters()]
    assert all(sharded) if run.env.enabled else not any(sharded)
    run.run()
finally:
    shutdown()
"""


@pytest.mark.slow
def test_two_processes_with_sharded_reward_models_match_one_with_whole_ones(tmp_path, setup, sp_model_path):
    """One RS iteration scored by two real reward models (the helpfulness one with the likelihood term): 2 gloo
    processes under torchrun with `reward_models: sharded` (each samples and scores its own slice of every batch;
    the last batch of 2 prompts leaves the second process an empty slice) give the samples, rewards, selection,
    held-out rewards and fine-tuned weights of one process holding the RMs whole."""
    import torch
    from helpers import one_and_two_processes, save_scaled_reward_models

    from llama2.checkpoint import load_checkpoint
    from llama2.checkpoint.runs import resolve_base

    save_scaled_reward_models(CFG, tmp_path / "rms", sp_model_path)
    # the same global batch of 4 dialogues per step: 2 micro-batches of 2 in one process, 1 in each of 2
    (tmp_path / "ft.yaml").write_text((setup / "ft.yaml").read_text().replace("batch_size: 4",
                                                                              "batch_size: 2\nglobal_batch_size: 4"))
    script = tmp_path / "driver.py"
    script.write_text(RS_DRIVER.format(tests=str(Path(__file__).parent), setup=str(setup),
                                       rms=str(tmp_path / "rms")))
    a, b = one_and_two_processes(tmp_path, [str(script), "whole"], [str(script), "sharded"])

    def rows(run, name):
        return [json.loads(x) for x in (tmp_path / run / "iter-1" / name).read_text().splitlines()]

    one, two = rows("one", "samples.jsonl"), rows("two", "samples.jsonl")
    assert len(one) == len(two) == 6
    assert [d["samples"] for d in two] == [d["samples"] for d in one]
    for key in ("reward", "helpfulness", "safety_score"):
        assert [x for d in two for x in d[key]] == pytest.approx([x for d in one for x in d[key]], abs=1e-5), key
    assert len({x for d in one for x in d["reward"]}) > 4  # the RMs tell the answers apart
    assert [d["answer"] for d in rows("two", "selected.jsonl")] == [d["answer"] for d in rows("one", "selected.jsonl")]
    for s in (0, 1):
        assert b[s]["heldout_reward"] == pytest.approx(a[s]["heldout_reward"], abs=1e-5)
    assert b[1]["finetune_steps"] == a[1]["finetune_steps"] > 0
    assert b[1]["finetune_loss"] == pytest.approx(a[1]["finetune_loss"], rel=1e-4, abs=1e-5)
    w1, w2 = (load_checkpoint(resolve_base(str(tmp_path / run / "iter-1" / "sft")), kind="causal_lm").state_dict()
              for run in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)
