"""Model comparison by a reward-model judge: win / tie / loss counting and the Wilson interval on hand-made
scores (the interval against the score test inverted by bisection), order symmetry, and `llama2 eval compare`
end to end on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama2.config import ModelConfig
from llama2.data.prompts import PromptItem
from llama2.errors import Llama2Error
from llama2.eval.compare import Comparison, compare_models, outcome, tally, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)


def test_outcomes_count_wins_ties_and_losses_with_the_margin():
    pa = [0.9, 0.5, 0.505, 0.2, 0.7, 0.31]
    pb = [0.1, 0.5, 0.5, 0.6, 0.69, 0.3]
    assert [outcome(a, b, 0.01) for a, b in zip(pa, pb)] == ["win", "tie", "tie", "loss", "tie", "tie"]
    assert [outcome(a, b, 0.0) for a, b in zip(pa, pb)] == ["win", "tie", "win", "loss", "win", "win"]
    t = tally(["win", "tie", "tie", "loss", "tie", "tie"])
    assert (t.wins, t.ties, t.losses, t.n, t.win_rate, t.win_or_half_tie) == (1, 4, 1, 6, 0.5, 0.5)
    assert tally(["tie", "tie"]).win_rate is None and tally(["tie"]).interval is None


def score_test_bound(w: int, n: int, z: float, upper: bool) -> float:
    """The Wilson bound by its definition: the p where |w/n - p| = z sqrt(p (1-p) / n), found by bisection."""
    phat = w / n
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    f = lambda p: abs(phat - p) - z * math.sqrt(p * (1 - p) / n)  # noqa: E731
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = f(mid) <= 0
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return (lo + hi) / 2


def test_wilson_interval_matches_the_score_test_and_published_values():
    z = 1.959963984540054
    for w, n in [(8, 10), (0, 10), (10, 10), (1, 3), (50, 100), (17, 40), (999, 1000)]:
        lo, hi = wilson_interval(w, n)
        assert lo == pytest.approx(score_test_bound(w, n, z, False) if w else 0.0, abs=1e-9)
        assert hi == pytest.approx(score_test_bound(w, n, z, True) if w < n else 1.0, abs=1e-9)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook 8 of 10
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(Llama2Error):
        wilson_interval(3, 2)


def hand_comparison(margin=0.01) -> Comparison:
    prompts = [PromptItem([{"role": "user", "content": f"q{i}"}], safety=i >= 4) for i in range(6)]
    return Comparison("A", "B", "rm", prompts, [f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)],
                      [0.9, 0.8, 0.5, 0.1, 0.6, 0.7], [0.2, 0.1, 0.505, 0.4, 0.3, 0.1], margin)


def test_comparison_table_rows_and_swapping_mirrors():
    cmp = hand_comparison()
    assert cmp.outcomes == ["win", "win", "tie", "loss", "win", "win"]
    t = cmp.tally()
    assert (t.wins, t.ties, t.losses) == (4, 1, 1) and t.win_rate == 0.8
    assert t.interval == pytest.approx(wilson_interval(4, 5))
    assert (cmp.tally(True).wins, cmp.tally(False).losses) == (2, 1)
    table = cmp.markdown()
    assert "| all prompts | 6 | 4 | 1 | 1 | 80.0% |" in table and "| safety prompts | 2 | 2 | 0 | 0 |" in table
    back = cmp.swapped()
    assert back.outcomes == \
        [{"win": "loss", "loss": "win", "tie": "tie"}[o] for o in cmp.outcomes]
    bt = back.tally()
    assert (bt.wins, bt.ties, bt.losses) == (t.losses, t.ties, t.wins)


def test_compare_models_with_answer_functions_and_a_fake_judge():
    class Judge:  # scores the answer alone, by its length, as a reward model scores each answer
        def probs(self, prompts, responses):
            return [min(1.0, len(r) / 10) for r in responses]

    judge = Judge()
    prompts = [PromptItem([{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    long = lambda ps: ["x" * 8 for _ in ps]  # noqa: E731
    short = lambda ps: ["x" * (2 * i) for i, _ in enumerate(ps)]  # noqa: E731  0, 2, 4, 6 chars
    cmp = compare_models(long, short, judge, prompts)
    assert cmp.outcomes == ["win"] * 4
    assert compare_models(short, long, judge, prompts).outcomes == ["loss"] * 4
    with pytest.raises(Llama2Error, match="no prompts"):
        compare_models(long, short, judge, [])
    with pytest.raises(Llama2Error, match="one string per prompt"):
        compare_models(lambda ps: ["x"], short, judge, prompts)


# -- end to end on tiny models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model_path):
    from llama2.checkpoint import load_checkpoint, save_checkpoint, save_model
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    tok = Tokenizer(sp_model_path)
    d = tmp_path_factory.mktemp("compare")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_model(Transformer(CFG), d / name, tok)
    torch.manual_seed(2)
    rm = load_checkpoint(d / "a", kind="classifier")
    with torch.no_grad():
        rm.score.weight.normal_()  # a head that tells answers apart clearly
    save_checkpoint(rm, d / "rm", tokenizer=tok)
    prompts = [{"prompt": f"Tell me about {t}."} for t in ("lists", "files", "loops", "sets", "dicts", "bytes")]
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return d


def test_compare_command_end_to_end_and_both_orders(tiny, capsys):
    from llama2.cli import main
    from llama2.data.prompts import read_prompts
    from llama2.reward import RewardModel

    out = tiny / "out" / "cmp.md"
    (tiny / "out").mkdir(exist_ok=True)
    args = ["--judge", str(tiny / "rm"), "--prompts", str(tiny / "prompts.jsonl"), "--max-new-tokens", "6",
            "--quiet"]
    assert main(["eval", "compare", str(tiny / "a"), str(tiny / "b"), *args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| all prompts | 6 |" in printed and printed in out.read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 6
    # the judge's probabilities are the reward model's own, scoring each answer alone
    rm = RewardModel.load(tiny / "rm")
    msgs = [r["prompt"] for r in rows]
    assert [r["p_a"] for r in rows] == pytest.approx(rm.probs(msgs, [r["answer_a"] for r in rows]), abs=1e-6)
    assert [r["p_b"] for r in rows] == pytest.approx(rm.probs(msgs, [r["answer_b"] for r in rows]), abs=1e-6)
    for r in rows:
        assert r["outcome"] == outcome(r["p_a"], r["p_b"])
    # both orders: B over A mirrors A over B exactly
    prompts = read_prompts(tiny / "prompts.jsonl")
    ab = compare_models(tiny / "a", tiny / "b", rm, prompts, max_new_tokens=6, quiet=True)
    ba = compare_models(tiny / "b", tiny / "a", rm, prompts, max_new_tokens=6, quiet=True)
    assert [r["outcome"] for r in rows] == ab.outcomes
    mirror = {"win": "loss", "loss": "win", "tie": "tie"}
    assert ba.outcomes == [mirror[o] for o in ab.outcomes]
    assert (ba.answers_a, ba.probs_a) == (ab.answers_b, ab.probs_b)
    # a model against itself: the same answers, all ties
    same = compare_models(tiny / "a", tiny / "a", rm, prompts, max_new_tokens=6, quiet=True)
    assert same.outcomes == ["tie"] * 6


def test_compare_command_errors(tiny, capsys):
    from llama2.cli import main

    assert main(["eval", "compare", str(tiny / "a"), str(tiny / "nope"), "--judge", str(tiny / "rm")]) != 0
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["eval", "compare", str(tiny / "a"), str(tiny / "b"), "--judge", str(tiny / "rm"),
                 "--limit", "0"]) != 0
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert main(["eval", "compare", str(tiny / "a"), str(tiny / "b"), "--judge", str(tiny / "a"),
                 "--prompts", str(tiny / "prompts.jsonl"), "--max-new-tokens", "2", "--quiet"]) != 0
    assert "not a reward model" in capsys.readouterr().err


def test_sampled_kl_is_zero_to_itself_and_equals_transformers_on_the_same_samples(tiny):
    """KL(a || b) on a's own samples: 0 for a model against itself; against another model, the mean over prompts
    of the summed log-ratio of the sampled answer's tokens, here recomputed with transformers' log-softmax."""
    from transformers import LlamaForCausalLM

    from llama2.chat import encode_dialog
    from llama2.checkpoint import load_checkpoint
    from llama2.eval.compare import sampled_kl
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.tokenizer import Tokenizer

    tok = Tokenizer(tiny / "a")
    a, b = (load_checkpoint(tiny / n).eval() for n in ("a", "b"))
    prompts = [[{"role": "user", "content": f"Tell me about {t}."}] for t in ("lists", "files", "loops")]
    assert sampled_kl(a, a, tok, prompts, max_new_tokens=12, seed=5) == 0.0
    got = sampled_kl(a, b, tok, prompts, max_new_tokens=12, seed=5, batch=2)
    ids = [encode_dialog(tok, m) for m in prompts]
    done = Generator(a, tok).generate(ids, [SamplingParams(temperature=1.0, max_new_tokens=12, seed=5 + i)
                                            for i in range(3)])
    hf_a, hf_b = (LlamaForCausalLM.from_pretrained(tiny / n).eval() for n in ("a", "b"))
    want = 0.0
    for p, c in zip(ids, done):
        seq = torch.tensor([p + list(c.tokens) + ([tok.eos_id] if c.finish_reason == "stop" else [])])
        with torch.no_grad():
            lp = [torch.log_softmax(m(seq).logits[0, :-1].float(), -1).gather(-1, seq[0, 1:, None])[:, 0]
                  for m in (hf_a, hf_b)]
        want += float((lp[0] - lp[1])[len(p) - 1:].sum())
    assert got == pytest.approx(want / 3, rel=1e-4, abs=1e-4)
    assert got > 0.01  # two random models differ
