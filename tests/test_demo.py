"""`llama2 demo` end to end on a fresh cache with a tiny budget: every stage runs, the report holds every section,
and its numbers are the run's own (checked against metrics.jsonl and the files the stages wrote)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

BUDGET_MINUTES = 1.5
# a hang guard, not a speed check: alone, on one thread (as `./run test` runs it), the 1.5-minute demo took 622 s
# from a fresh cache on a 2-core Xeon (data and tokenizer built, every stage at its smallest size); with two threads
# beside the other pytest worker's tests, CI once needed more than 1,800 s
DEMO_TIMEOUT = 1800
SECTIONS = ["1. Pretraining", "2. Generating", "3. The Llama 2 chat format", "4. Supervised fine-tuning",
            "5. Reward models", "6. Rejection sampling", "7. PPO", "8. Ghost Attention",
            "9. Safety context distillation", "10. Evaluation", "11. Tool use", "12. Checkpoint formats"]


def _row(md: str, label: str) -> list[str]:
    """The cells after `label` in the report's table row that starts with it."""
    for line in md.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in re.split(r"(?<!\\)\|", line)[2:-1]]
    raise AssertionError(f"no table row {label!r} in the report")


@pytest.mark.slow
def test_demo_runs_end_to_end_from_a_fresh_cache(tmp_path, monkeypatch):
    env = {**os.environ, "LLAMA2_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    from llama2.data.world import data_path, judge, load_world, read_gold

    r = subprocess.run([sys.executable, "-m", "llama2", "demo", "--out", str(out), "--budget-minutes",
                        str(BUDGET_MINUTES), "--quiet"], capture_output=True, text=True, env=env, timeout=DEMO_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    for title in SECTIONS:
        assert f"== {title}" in r.stdout
    assert f"Report: {out / 'report.md'}" in r.stdout
    md = (out / "report.md").read_text()
    headings = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS  # in order, none "(running)" or "(failed)"

    # pretraining: the table's numbers are metrics.jsonl's, and training lowered the loss
    records = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in records if "loss" in x]
    first, last = (float(c) for c in _row(md, "training loss (first / last logged step)"))
    assert (first, last) == (pytest.approx(losses[0], abs=5e-4), pytest.approx(losses[-1], abs=5e-4))
    assert last < first
    before, after = (float(c) for c in _row(md, "held-out loss (nats/token)"))
    assert after == pytest.approx([x for x in records if "val_loss" in x][-1]["val_loss"], abs=5e-4)
    assert after < before and abs(before - 6.931) < 0.3  # random init: about ln(1024) = 6.931 (the world's vocab)
    step = records[-1]["step"]
    assert (out / "pretrain" / "checkpoints" / f"step-{step:06d}" / "model.safetensors").is_file()

    # SFT ran from that checkpoint and wrote its own run; its loss table compares with its metrics
    sft = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    sft_val = [x for x in sft if "val_loss" in x][-1]["val_loss"]
    assert float(_row(md, "held-out answer-token loss")[1]) == pytest.approx(sft_val, abs=5e-4)
    rouge = [float(c) for c in _row(md, "ROUGE-L F1 against the real answer (mean of 8)")]
    assert all(0.0 <= v <= 1.0 for v in rouge)

    # reward models: Table 8's cells are the runs' own last evaluations (in %), before and after training
    for kind in ("helpfulness", "safety"):
        evals = [json.loads(x) for x in (out / f"rm-{kind}" / "metrics.jsonl").read_text().splitlines()]
        evals = [x for x in evals if "val_accuracy" in x]
        assert evals[0]["step"] == 0 and (out / f"rm-{kind}" / "eval.md").is_file()
        row = _row(md, f"{kind} RM, helpfulness held-out, after training")
        want = evals[-1].get("val_accuracy/helpfulness/significantly_better")
        assert float(row[0]) == pytest.approx(100 * want, abs=0.06)
        assert float(row[-1]) == pytest.approx(100 * evals[-1]["val_accuracy/helpfulness"], abs=0.06)
    assert "| paper: Helpfulness RM, Meta Helpful test set | 80.7 | 67.5 | 60.9 | 54.7 | 63.2 |" in md

    # rejection sampling: one record per iteration, the table's held-out rewards are theirs
    rs = [json.loads(x) for x in (out / "rejection" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in rs] == [0, 1, 2]
    assert float(_row(md, "V0 (the SFT model)")[3]) == pytest.approx(rs[0]["heldout_reward"], abs=5e-4)
    assert float(_row(md, "V2")[3]) == pytest.approx(rs[2]["heldout_reward"], abs=5e-4)
    assert (out / "rejection" / "reward_by_k.png").is_file()

    # PPO: the table's rewards are the metrics' means
    ppo_rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    ppo_rows = [x for x in ppo_rows if "reward" in x]
    n = max(1, min(3, len(ppo_rows) // 2))
    got = float(_row(md, f"last {n} iteration(s)")[0])
    assert got == pytest.approx(sum(x["reward"] for x in ppo_rows[-n:]) / n, abs=5e-4)

    # safety distillation: the table's scores and rates are the red-team files' own
    ds = [json.loads(x) for x in (out / "safety" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in ds] == [0, 1]
    row = _row(md, "mean safety RM score (adversarial)")
    assert [float(c) for c in row] == [pytest.approx(ds[0]["heldout_safety"], abs=5e-4),
                                       pytest.approx(ds[1]["heldout_safety"], abs=5e-4)]
    refusals = _row(md, "false-refusal rate (benign look-alikes)")
    assert [float(c.rstrip("%")) for c in refusals] == [pytest.approx(100 * ds[0]["false_refusal_rate"], abs=0.06),
                                                        pytest.approx(100 * ds[1]["false_refusal_rate"], abs=0.06)]
    kept = [json.loads(x)["kept"] for x in (out / "safety" / "distill.jsonl").read_text().splitlines()]
    assert ds[1]["kept"] <= sum(kept) and ds[1]["distill_prompts"] == len(kept)

    # evaluation: one perplexity row per model, and the comparison's counts add up to its prompts
    for label in ("pretrained", "SFT"):
        assert 0 < float(_row(md, label)[0]) < 8
    wins, ties, losses = (int(c) for c in _row(md, "final (GAtt + safety) vs SFT, judged by the helpfulness RM")[:3])
    assert wins + ties + losses == 48

    # gold: every stage's figure from the built-in world, and each one is its judged answers' own
    results = json.loads((out / "results.json").read_text())
    assert results["world"] == "world"
    gold = results["gold"]
    assert set(gold) >= {"pretrain_cloze", "sft", "reward", "rejection", "ppo", "gatt", "safety", "models"}
    world = load_world()
    monkeypatch.setenv("LLAMA2_CACHE", env["LLAMA2_CACHE"])  # the world the demo built
    items = {i.id: i for i in read_gold(data_path("builtin:world/gold.val.jsonl"))}
    for name, run in gold["models"].items():
        rows = run["answers"]
        assert rows and all(r["correct"] == judge(world, items[r["id"]], r["answer"]).correct for r in rows), name
        helpful = [r["correct"] for r in rows if r["family"] not in ("harmful", "benign")]
        assert run["helpful_accuracy"] == pytest.approx(sum(helpful) / len(helpful), abs=1e-4)
    sft_after = gold["sft"]["after"]["helpful_accuracy"]
    assert gold["models"]["SFT"]["helpful_accuracy"] == pytest.approx(sft_after, abs=1e-4)
    assert f"| {100 * sft_after:.1f} |" in md  # the SFT gold table's "all helpfulness families" cell
    for kind in ("helpfulness", "safety"):
        assert set(gold["reward"][f"{kind}_rm/helpfulness_pairs"]["accuracy"]) >= {"significantly_better", "all"}
    # the RMs' gold agreement (from their last held-out evaluation's scores) equals scoring the pairs afresh
    from llama2.data.jsonl import read_jsonl
    from llama2.reward import RewardModel

    pairs = [o for _, o in read_jsonl(data_path("builtin:world/comparisons-helpfulness.val.jsonl"))][:600]
    rm = RewardModel.load(results["rm_helpfulness_checkpoint"])
    chosen = rm.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = rm.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    agree = [0.5 if c == r else float((c > r) == (p["gold_gap"] > 0)) for p, c, r in zip(pairs, chosen, rejected)]
    # a pair whose two scores lie within bf16 rounding of each other may flip between batchings (a barely trained
    # RM has many): each such pair may count either way
    near_ties = sum(abs(c - r) < 0.05 for c, r in zip(chosen, rejected))
    assert gold["reward"]["helpfulness_rm/helpfulness_pairs"]["accuracy"]["all"] == pytest.approx(
        sum(agree) / len(agree), abs=(2 + near_ties) / len(agree))
    assert gold["rejection"]["best_of_k"]["k"][0] == 1 and (out / "figures" / "rejection" / "gold_best_of_k.png"
                                                            ).is_file()
    ranked = gold["rejection"]["best_of_k"]
    assert (ranked["right_over_wrong"] is None) == (ranked["ranked_pairs"] == 0)
    assert len(gold["ppo"]["runs"]) == 2 and (out / "figures" / "ppo" / "gold.png").is_file()
    for label, curve in gold["ppo"]["runs"].items():  # the last checkpoint's violations, recounted by the judge
        harmful = [a for a in curve["after"]["answers"] if a["family"] == "harmful"]
        answered = [not judge(world, items[a["id"]], a["answer"]).refusal for a in harmful]
        assert len(curve["violations"]) == len(curve["step"]), label
        assert curve["violations"][-1] == pytest.approx(sum(answered) / len(answered), abs=1e-4), label
    assert 20 in [int(t) for t in gold["gatt"]["turns"]]
    assert {"violations", "false_refusals"} <= set(gold["safety"]["after"])

    # figures: every image the report references exists, and report.html embeds them
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) >= 4 and all((out / ref).is_file() for ref in refs)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(refs) and "<script" not in page

    assert "weights identical after the round trip: True" in r.stdout
    assert sorted(p.name for p in (out / "meta").iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                                "params.json"]

    # compare-methods from the demo's SFT model and RMs, two seeds: the chosen methods ran once per seed, each run is
    # its judged answers' own, and a method's row holds the runs' mean and Student's t interval (scipy's) of their
    # changes (two of the five methods, the two quickest at their smallest size: all five took 410 s here; each
    # method's training is tested in its stage's tests)
    from scipy import stats

    methods = tmp_path / "methods"
    r = subprocess.run([sys.executable, "-m", "llama2", "compare-methods", "--from", str(out), "--out", str(methods),
                        "--budget-minutes", "1", "--methods", "ppo,grpo-gold", "--seeds", "2", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=DEMO_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    from llama2.report.sections.methods import LABELS

    rows = json.loads((methods / "results.json").read_text())["gold"]["methods"]
    assert list(rows) == ["SFT (the start)", LABELS["ppo"], LABELS["grpo-gold"]]
    md = (methods / "report.md").read_text()
    for label, row in rows.items():
        runs = row.get("seeds", [row])
        assert label.startswith("SFT") or [run["seed"] for run in runs] == [0, 1], label
        for run in runs:
            answers = run["gold"]["answers"]
            assert all(a["correct"] == judge(world, items[a["id"]], a["answer"]).correct for a in answers), label
            helpful = [a for a in answers if a["family"] not in ("harmful", "benign")]
            assert run["accuracy"] == pytest.approx(sum(a["correct"] for a in helpful) / len(helpful), abs=1e-4)
            scores = [judge(world, items[a["id"]], a["answer"]).score for a in helpful]  # 0.7 right + 0.2 + 0.1
            assert run["score"] == pytest.approx(100 * sum(scores) / len(scores), abs=0.006)
        assert row["accuracy"] == pytest.approx(sum(run["accuracy"] for run in runs) / len(runs), abs=1e-4)
        assert row["score"] == pytest.approx(sum(run["score"] for run in runs) / len(runs), abs=0.006)
        cells = _row(md, label)
        assert cells[0] == f"{100 * row['accuracy']:.1f}" and cells[2] == f"{row['score']:.1f}"
        if not label.startswith("SFT"):
            for key, interval in (("points", "ci95"), ("score_points", "score_ci95")):
                changes = [run["change"][key] for run in runs]
                mean = sum(changes) / 2
                low, high = stats.t.interval(0.95, 1, loc=mean, scale=stats.sem(changes)) \
                    if len(set(changes)) > 1 else (mean, mean)
                assert row["change"][key] == pytest.approx(mean, abs=0.051)
                assert row["change"][interval] == pytest.approx([low, high], abs=0.051), (label, key)
    assert rows["SFT (the start)"]["accuracy"] == pytest.approx(sft_after, abs=1e-4)  # the demo's SFT model
    assert (methods / "figures" / "methods" / "methods.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_methods_refuses_mixed_or_unknown_inputs(tmp_path, capsys):
    from llama2.cli import main

    assert main(["compare-methods", "--from", str(tmp_path), "--sft", str(tmp_path)]) != 0
    assert "either --from" in capsys.readouterr().err
    assert main(["compare-methods", "--methods", "ppo,kto", "--from", str(tmp_path)]) != 0
    assert "unknown method(s) kto" in capsys.readouterr().err
    assert main(["compare-methods", "--from", str(tmp_path / "nothing")]) != 0
    err = capsys.readouterr().err
    assert "SFT model" in err and "does not exist" in err
