"""KL divergence between next-token distributions: one implementation for training and evaluation."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["kl_per_token", "mean_kl"]


def kl_per_token(
    reference_logits: torch.Tensor,
    logits: torch.Tensor,
    direction: Literal["forward", "reverse"] = "forward",
) -> torch.Tensor:
    """KL in nats at every position, ``(...,)`` from ``(..., V)`` logits, computed in float32.

    ``forward`` is KL(reference ‖ other) = Σ p_r (log p_r − log p_o) (mass-covering: it punishes the
    other model for dropping probability the reference assigns; the metric we report); ``reverse``
    is KL(other ‖ reference). Gradients flow into both arguments; detach the reference yourself.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    log_r = F.log_softmax(reference_logits.float(), dim=-1)
    log_o = F.log_softmax(logits.float(), dim=-1)
    if direction == "forward":
        return (log_r.exp() * (log_r - log_o)).sum(-1)
    if direction == "reverse":
        return (log_o.exp() * (log_o - log_r)).sum(-1)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ other) in nats (a number for reports)."""
    return float(kl_per_token(reference_logits, logits).mean())
