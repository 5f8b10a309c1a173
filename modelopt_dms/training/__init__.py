"""Retrofit training of DMS decision heads by logit distillation."""

from .losses import compression_loss, distillation_kl, target_compression_ratio, target_eviction_rate

__all__ = ["compression_loss", "distillation_kl", "target_compression_ratio", "target_eviction_rate"]
