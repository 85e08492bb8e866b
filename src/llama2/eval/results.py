"""Results tables: Table 3's group averages (each task's reported metric, in %) and Markdown tables of the
per-task metrics and of the groups beside the paper's Llama 2 rows."""

from __future__ import annotations

from typing import Any

from . import tasks as T

GROUP_TITLES = {"code": "Code", "commonsense": "Commonsense", "world_knowledge": "World knowledge",
                "reading_comprehension": "Reading comp.", "math": "Math", "mmlu": "MMLU", "bbh": "BBH",
                "agieval": "AGI Eval"}


def reported(task: str, metrics: dict[str, float]) -> float | None:
    """The task's Table 3 metric in % (None when the run did not produce it)."""
    m = T.TASKS[task].metric
    if m not in metrics:
        m = next((k for k in metrics if k.startswith(m.split("@")[0] + "@")), m)  # maj@1 <-> maj@k
    value = metrics.get(m)
    return None if value is None else 100.0 * value


def group_scores(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{group: mean of its tasks' reported metric, in %} for every group whose tasks all ran."""
    out = {}
    for group, members in T.GROUPS.items():
        values = [reported(t, results[t]) for t in members if t in results]
        if len(values) == len(members) and all(v is not None for v in values):
            out[group] = sum(values) / len(values)
    return out


def markdown(report: dict[str, Any]) -> str:
    """The per-task metrics, then the groups beside the paper's Table 3 (when any group is complete)."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in report["results"].items():
        for name, value in metrics.items():
            shown = f"{100 * value:.1f}" if _is_fraction(name) else f"{value:.4g}"
            lines.append(f"| {task} | {name} | {shown} |")
    groups = report.get("groups") or {}
    if groups:
        cols = [g for g in T.TABLE3 if g in groups]
        lines += ["", "| model | " + " | ".join(GROUP_TITLES[g] for g in cols) + " |",
                  "|---|" + "---|" * len(cols),
                  "| **this checkpoint** | " + " | ".join(f"{groups[g]:.1f}" for g in cols) + " |"]
        for model, row in T.PAPER_TABLE3.items():
            lines.append(f"| {model} (paper) | " + " | ".join(f"{row[g]:.1f}" for g in cols) + " |")
    return "\n".join(lines)


def _is_fraction(metric: str) -> bool:
    return metric in ("acc", "acc_norm", "em", "f1", "mc1", "mc2") or "@" in metric
