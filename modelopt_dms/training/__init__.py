"""Retrofit training of DMS decision heads by logit distillation."""

from .config import TrainConfig
from .losses import compression_loss, distillation_kl, target_compression_ratio, target_eviction_rate
from .trainer import TrainingDivergedError, train

__all__ = [
    "TrainConfig",
    "TrainingDivergedError",
    "compression_loss",
    "distillation_kl",
    "target_compression_ratio",
    "target_eviction_rate",
    "train",
]
