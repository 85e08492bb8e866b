"""PNG figures: one way to get matplotlib (headless, Agg backend) and one way to write a figure (atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import atomic_open


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use, it is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path | str) -> Path:
    """Write `fig` as a PNG at `path` (write, fsync, rename: a killed run never leaves half a file) and close it."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path
