"""Turning a loss into a better model: the trainer, schedules, losses, checkpoints."""

from tformer.training.checkpoint import CheckpointError, load_weights, read_config, save_checkpoint
from tformer.training.losses import sequence_cross_entropy
from tformer.training.trainer import Trainer

__all__ = [
    "CheckpointError",
    "Trainer",
    "load_weights",
    "read_config",
    "save_checkpoint",
    "sequence_cross_entropy",
]
