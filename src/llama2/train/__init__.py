"""Training: the one loop every stage drives (loop.Trainer), its checkpoints, schedule, metrics, plots and the
distributed (FSDP2) setup. The stages themselves live in llama2.stages.

    from llama2.train import Trainer, LossOutput, TrainRecipe
"""

from .checkpoints import CheckpointIO, CheckpointManager, FnState
from .config import OptimConfig, PretrainRecipe, TrainRecipe
from .loop import HFCheckpointIO, LossOutput, NonFiniteLoss, StepTotals, Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "LossOutput", "StepTotals", "HFCheckpointIO", "CheckpointIO",
           "CheckpointManager", "FnState", "NonFiniteLoss", "TrainRecipe", "OptimConfig", "PretrainRecipe"]
