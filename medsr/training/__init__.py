"""Training: one loop for plain and adversarial generators, and its checkpoints.

    >>> from medsr.training import TrainConfig, train_generator, load_generator
    >>> result = train_generator(TrainConfig.from_params(params, "espcn", 4))  # doctest: +SKIP
    >>> generator = load_generator(result.best_checkpoint, "cpu")              # doctest: +SKIP
"""

from medsr.training.checkpoint import CheckpointError, checkpoint_info, load_checkpoint, load_generator
from medsr.training.config import TrainConfig
from medsr.training.data import PatchBatches, pair_set_path
from medsr.training.trainer import NonFiniteLossError, TrainResult, train_generator

__all__ = [
    "CheckpointError", "NonFiniteLossError", "PatchBatches", "TrainConfig", "TrainResult", "checkpoint_info",
    "load_checkpoint", "load_generator", "pair_set_path", "train_generator",
]
