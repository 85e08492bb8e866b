"""PNG curves of a run's metrics.jsonl (matplotlib, Agg backend): loss (+ validation), learning rate,
throughput, and every other numeric metric a stage logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import make_dir
from ..figures import pyplot, save_png
from ..errors import Llama2Error
from .metrics import read_metrics

SKIP = {"step", "tokens", "elapsed_s", "loss", "val_loss", "val_ppl"}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Write loss.png (train and validation loss), lr.png, tokens_per_s.png and one PNG per other numeric
    metric into out_dir (default: the run directory); returns the files written."""
    plt = pyplot()

    run = Path(run_dir)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise Llama2Error(f"no metrics.jsonl in {run}; give a run directory (the out_dir of a training run)")
    records = read_metrics(path)
    if not records:
        raise Llama2Error(f"{path} holds no metrics yet; plot after some steps have been logged")
    out = make_dir(out_dir) if out_dir is not None else path.parent
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=3)
    for key in sorted({k for r in records for k in r if k.startswith("val_loss/")}):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, "--", label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, out / "loss.png")
    written.append(out / "loss.png")

    keys = sorted({k for r in records for k, v in r.items()
                   if k not in SKIP and not k.startswith("val_loss/") and isinstance(v, (int, float))
                   and not isinstance(v, bool)})
    for key in keys:
        xs, ys = _series(records, key)
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(xs, ys, "-" if len(xs) > 1 else "o")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{run.name}: {key}")
        ax.grid(alpha=0.3)
        name = key.replace("/", "_") + ".png"
        save_png(fig, out / name)
        written.append(out / name)
    return written
