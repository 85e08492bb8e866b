"""Training: one shared loop (loop.Trainer) that every stage drives, and the pretraining stage.

    from llama2.train import Trainer, LossOutput, load_recipe, PretrainRecipe, pretrain
"""

from .config import OptimConfig, PretrainRecipe, TrainRecipe, load_recipe
from .checkpoints import CheckpointIO, CheckpointManager, FnState
from .loop import HFCheckpointIO, LossOutput, NonFiniteLoss, StepTotals, Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "LossOutput", "StepTotals", "HFCheckpointIO", "CheckpointIO",
           "CheckpointManager", "FnState", "NonFiniteLoss", "TrainRecipe", "OptimConfig", "PretrainRecipe",
           "load_recipe", "pretrain"]


def pretrain(recipe: PretrainRecipe, quiet: bool = False) -> TrainResult:
    """Run (or resume) pretraining; see llama2.stages.pretrain."""
    from ..stages.pretrain import pretrain as _pretrain

    return _pretrain(recipe, quiet=quiet)
