"""The demo's data, built (or found in the cache) before the first section so that its cost comes out of the
budget before the sections share what is left: the pretraining corpus, tokenizer and token shards, the built-in
dialogues (SFT, GAtt, the replay of safety distillation) and the built-in comparisons (the reward models; with the
dialogues they make the prompt sets of rejection sampling, PPO and the evaluation), and the CPU kernels of the
generation path (compiled into the cache)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ...data.comparisons import ensure_comparisons
from ...data.corpus import STATS_FILE
from ...data.dialogues import ensure_dialogues
from ...data.sources import PYTHON_DOCS_ROOT
from ...data.world import ensure_world
from ...inference import cpu_kernels
from ...paths import expand_path
from ...stages.pretrain import ensure_built_data
from ...train.config import PretrainRecipe
from .artifacts import BuiltData
from .common import Demo
from .gold import GoldBench


def pretrain_recipe(demo: Demo, run_dir: Path) -> PretrainRecipe:
    """The demo's pretraining recipe writing to run_dir (in the stdlib world with the Python documentation added to
    its corpus where it is installed)."""
    overrides = [f"out_dir={run_dir}", "save_every=0", "keep_last=1"]
    build = demo.load(PretrainRecipe, "pretrain.yaml").data.build
    if demo.world == "stdlib" and build is not None and PYTHON_DOCS_ROOT.is_dir() \
            and "python-docs" not in build.corpus:
        corpus = [*build.corpus, "python-docs"]
        overrides += [f"data.build.corpus=[{', '.join(corpus)}]",
                      f"data.build.dir={build.dir.rstrip('/')}-docs"]
    return demo.load(PretrainRecipe, "pretrain.yaml", overrides)


def build_data(demo: Demo) -> BuiltData:
    """Build what is missing; returns what was built and how long it took."""
    t0 = time.time()
    recipe = pretrain_recipe(demo, demo.out / "pretrain")
    build = recipe.data.build
    cached = False
    root = None
    if build is not None:
        built = expand_path(build.dir)
        cached = (built / "corpus" / "train.jsonl").is_file() and (built / "shards" / "manifest.json").is_file()
        root = ensure_built_data(build, quiet=demo.quiet)
    pretrain_s = time.time() - t0
    stats = json.loads((root / "corpus" / STATS_FILE).read_text()) if root else {}
    if demo.world == "world":
        ensure_world(quiet=demo.quiet)
        demo.gold = GoldBench.load(seed=demo.seed)
    else:
        ensure_dialogues(quiet=demo.quiet)
        ensure_comparisons(quiet=demo.quiet)
    cpu_kernels.available()  # compiles the generation path's CPU kernels into the cache on first use
    return BuiltData(recipe, root, stats, cached, 0.0 if cached else pretrain_s, time.time() - t0)
