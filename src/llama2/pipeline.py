"""Build what a recipe needs, then run its stage: the one place where stages meet.

A stage reads the checkpoints its recipe names (`base`, `helpfulness_rm`, `safety_rm`) and never builds them. A
recipe may also name the recipe that builds each one (`base_recipe`, `helpfulness_rm_recipe`,
`safety_rm_recipe`); `run` builds every missing checkpoint that way first (recursively: an RLHF recipe on a fresh
checkout builds the tiny base, the SFT model and both reward models), then runs the stage.

    from llama2 import pipeline
    pipeline.run_recipe("sft", "configs/tiny/sft.yaml", ["max_steps=50"])   # = llama2 sft --config ... max_steps=50
    pipeline.run(recipe)                                                     # a loaded recipe, any stage
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .checkpoint.runs import base_exists
from .errors import Llama2Error
from .paths import config_path, expand_path
from .recipe import load_recipe
from .stages.dpo import DPORecipe, dpo
from .stages.gatt import GattRecipe, gatt
from .stages.grpo import GRPORecipe, grpo
from .stages.ppo import PPORecipe, ppo
from .stages.pretrain import pretrain
from .stages.rejection import RejectionRecipe, rejection_sampling
from .stages.reward import RewardRecipe, reward
from .stages.safety import DistillSafetyRecipe, distill_safety
from .stages.sft import SFTRecipe, sft
from .train.config import PretrainRecipe


@dataclass(frozen=True)
class Need:
    """A checkpoint a recipe names (`key`), the recipe key that builds it (`recipe_key`) and the stage that does."""

    key: str
    recipe_key: str
    what: str
    builder: str  # a stage name; "policy": an SFT recipe, or a rejection-sampling one (recognised by its keys)
    needed: Callable[[Any], bool] = lambda recipe: True  # whether this recipe uses the checkpoint at all


@dataclass(frozen=True)
class Stage:
    recipe: type
    run: Callable[..., Any]
    needs: tuple[Need, ...] = ()


RM_NEEDS = (Need("helpfulness_rm", "helpfulness_rm_recipe", "helpfulness RM", "reward"),
            Need("safety_rm", "safety_rm_recipe", "safety RM", "reward"))

STAGES: dict[str, Stage] = {
    "pretrain": Stage(PretrainRecipe, pretrain),
    "sft": Stage(SFTRecipe, sft, (Need("base", "base_recipe", "base model", "pretrain"),)),
    "reward": Stage(RewardRecipe, reward, (Need("base", "base_recipe", "chat model", "sft"),)),
    "rejection-sampling": Stage(RejectionRecipe, rejection_sampling,
                                (Need("base", "base_recipe", "starting policy", "sft"), *RM_NEEDS)),
    "ppo": Stage(PPORecipe, ppo, (Need("base", "base_recipe", "starting policy", "policy"), *RM_NEEDS)),
    "dpo": Stage(DPORecipe, dpo, (Need("base", "base_recipe", "chat model", "policy"),)),
    "grpo": Stage(GRPORecipe, grpo, (Need("base", "base_recipe", "starting policy", "policy"),
                                     *(dataclasses.replace(n, needed=lambda r: r.reward == "rm") for n in RM_NEEDS))),
    "gatt": Stage(GattRecipe, gatt, (Need("base", "base_recipe", "starting model", "sft"),)),
    "distill-safety": Stage(DistillSafetyRecipe, distill_safety,
                            (Need("base", "base_recipe", "chat model", "sft"), *RM_NEEDS)),
}


def stage_of(recipe: Any) -> str:
    """The stage name of a loaded recipe."""
    for name, stage in STAGES.items():
        if type(recipe) is stage.recipe:
            return name
    raise Llama2Error(f"{type(recipe).__name__} is not the recipe of a stage; stages: {', '.join(STAGES)}")


def run_recipe(stage: str, path: str | Path | None, overrides: list[str] | None = None, quiet: bool = False) -> Any:
    """Load the recipe of `stage` (YAML + `key=value` overrides) and run it (see `run`)."""
    if stage not in STAGES:
        raise Llama2Error(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return run(load_recipe(STAGES[stage].recipe, path, overrides), quiet=quiet)


def run(recipe: Any, quiet: bool = False) -> Any:
    """Build the checkpoints the recipe needs and are missing, then run its stage; returns the stage's result."""
    prepare(recipe, quiet=quiet)
    return STAGES[stage_of(recipe)].run(recipe, quiet=quiet)


def prepare(recipe: Any, quiet: bool = False) -> None:
    """Build each checkpoint the recipe names that is missing, with the recipe its `*_recipe` key names."""
    for need in STAGES[stage_of(recipe)].needs:
        path, builder = getattr(recipe, need.key), getattr(recipe, need.recipe_key)
        if path and builder and need.needed(recipe) and not base_exists(path):
            build(need, path, builder, quiet)


def build(need: Need, path: str, recipe_path: str, quiet: bool) -> None:
    """Run the recipe at `recipe_path` so that its checkpoint lands at `path`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise Llama2Error(f"{need.what} {expand_path(path)} does not exist; under torchrun it is not built: build it "
                          "first in one process (run the same command without torchrun), or give an existing "
                          "checkpoint")
    file = config_path(recipe_path)
    if not quiet:
        print(f"building the {need.what}: {recipe_path} into {path}", flush=True)
    stage = need.builder
    if stage == "policy":
        stage = "rejection-sampling" if "samples_per_prompt" in _keys(file) else "sft"
    if stage == "rejection-sampling":  # it runs into its own out_dir; `path` must name its last iteration
        result = run_recipe(stage, file, quiet=quiet)
        if not Path(path).exists():
            raise Llama2Error(f"the rejection-sampling recipe {recipe_path} finished with its policy at "
                              f"{result.policy}, not at base {path}; set base to that run's last iteration "
                              "(iter-N/sft)")
        return
    run_recipe(stage, file, [f"out_dir={path}"], quiet=quiet)


def _keys(file: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text()) if file.is_file() else None
    except yaml.YAMLError:
        data = None
    return data if isinstance(data, dict) else {}
