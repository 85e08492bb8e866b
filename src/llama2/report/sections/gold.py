"""The demo's gold bench: the built-in world's held-out questions (the same draw for every model), each model's
answers judged by the world's gold judge, and the tables and results.json entries every section shares. A model
is measured once per checkpoint (the evaluation section reuses what the stages measured)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint import load_checkpoint
from ...data.world import (ANSWER_TOKENS, HELPFUL_FAMILIES, GoldItem, Verdict, World, data_path, load_world,
                           read_gold)
from ...eval.gold import GoldRun, gold_eval, paired_difference, pick, safety_rates
from ...tokenizer import Tokenizer
from ..report import Section

PER_FAMILY = 60  # held-out questions per family in every gold table


@dataclass
class GoldBench:
    """Held-out gold items and every model's run on them, by checkpoint."""

    world: World
    items: list[GoldItem]
    runs: dict[str, GoldRun] = field(default_factory=dict)

    @classmethod
    def load(cls, per_family: int = PER_FAMILY, seed: int = 0) -> GoldBench:
        return cls(load_world(), pick(read_gold(data_path("builtin:world/gold.val.jsonl")), per_family, seed))

    def helpful(self) -> list[GoldItem]:
        return [i for i in self.items if i.family in HELPFUL_FAMILIES]

    def measure(self, checkpoint: Path | str) -> GoldRun:
        """The gold run of a checkpoint (measured on first use)."""
        key = str(checkpoint)
        if key not in self.runs:
            model = load_checkpoint(checkpoint).eval()
            self.runs[key] = gold_eval(model, Tokenizer(checkpoint), self.world, self.items,
                                       max_new_tokens=ANSWER_TOKENS)
        return self.runs[key]


def helpful_verdicts(run: GoldRun) -> list[Verdict]:
    """The verdicts on the answers to helpfulness questions (the safety families left out)."""
    return [v for i, v in zip(run.items, run.verdicts) if i.family in HELPFUL_FAMILIES]


def helpful_correct(run: GoldRun) -> list[float]:
    """1.0 / 0.0 per answer to a helpfulness question."""
    return [float(v.correct) for v in helpful_verdicts(run)]


def helpful_accuracy(run: GoldRun) -> float:
    """Gold accuracy over the helpfulness families only."""
    xs = helpful_correct(run)
    return sum(xs) / max(len(xs), 1)


def helpful_scores(run: GoldRun) -> list[float]:
    """The gold score (0.7 right + 0.2 concise + 0.1 tidy) per answer to a helpfulness question."""
    return [v.score for v in helpful_verdicts(run)]


def helpful_score(run: GoldRun) -> float:
    """The mean gold score over the helpfulness families, in points (0-100)."""
    xs = helpful_scores(run)
    return 100 * sum(xs) / max(len(xs), 1)


def effect(before: GoldRun, after: GoldRun) -> dict[str, Any]:
    """The paired change in helpfulness gold accuracy, with its 95% interval (points), and the same for the gold
    score (`score_points`, `score_ci95`)."""
    mean, lo, hi = paired_difference(helpful_correct(before), helpful_correct(after))
    s_mean, s_lo, s_hi = paired_difference(helpful_scores(before), helpful_scores(after))
    return {"points": round(100 * mean, 1), "ci95": [round(100 * lo, 1), round(100 * hi, 1)],
            "score_points": round(100 * s_mean, 1), "score_ci95": [round(100 * s_lo, 1), round(100 * s_hi, 1)]}


def effect_text(change: dict[str, Any]) -> str:
    """'+0.6 points [-1.2, +2.3], gold score +5.1 [+3.0, +7.2]': both paired changes with their 95% intervals."""
    return (f"{change['points']:+.1f} points [{change['ci95'][0]:+.1f}, {change['ci95'][1]:+.1f}], gold score "
            f"{change['score_points']:+.1f} [{change['score_ci95'][0]:+.1f}, {change['score_ci95'][1]:+.1f}]")


def gold_table(section: Section, runs: dict[str, GoldRun], caption: str) -> None:
    """Gold accuracy (%) per family, one column per model, with each model's 95% interval overall."""
    names = list(runs)
    families = [f for f in HELPFUL_FAMILIES if f in next(iter(runs.values())).by_family]
    rows = []
    for f in families:
        rows.append([f.replace("_", " "), runs[names[0]].by_family[f]["n"],
                     *[f"{100 * r.by_family[f]['accuracy']:.0f}" for r in runs.values()]])
    n = sum(r[1] for r in rows)
    rows.append(["all helpfulness families", n, *[f"{100 * helpful_accuracy(r):.1f}" for r in runs.values()]])
    rows.append(["gold score (0.7 right + 0.2 concise + 0.1 tidy), points", n,
                 *[f"{helpful_score(r):.1f}" for r in runs.values()]])
    rows.append(["concise answers (%)", n, *[f"{100 * concise_share(r):.0f}" for r in runs.values()]])
    if "harmful" in next(iter(runs.values())).by_family:
        rates = [safety_rates(r) for r in runs.values()]
        rows.append(["harmful: violations (lower is better)", rates[0]["violations"]["n"],
                     *[f"{100 * x['violations']['rate']:.0f}" for x in rates]])
        rows.append(["benign look-alikes: false refusals", rates[0]["false_refusals"]["n"],
                     *[f"{100 * x['false_refusals']['rate']:.0f}" for x in rates]])
    section.table(["gold accuracy (%)", "n", *names], rows, caption=caption)


def concise_share(run: GoldRun) -> float:
    """The share of helpfulness answers the gold judge finds concise."""
    xs = [v.concise for v in helpful_verdicts(run)]
    return sum(xs) / max(len(xs), 1)


def run_results(run: GoldRun) -> dict[str, Any]:
    """What results.json keeps of a gold run: the figures and every judged answer."""
    return {"helpful_accuracy": round(helpful_accuracy(run), 4), "helpful_score": round(helpful_score(run), 2),
            "concise": round(concise_share(run), 4), "summary": run.summary(),
            "safety": safety_rates(run), "answers": run.rows()}
