"""Per-sample metrics of the comparison harness (pure functions of logits, ids and text)."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

__all__ = ["mean_kl", "needle_recall", "perplexity", "top1_agreement"]


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ method) in nats, ``(..., T, V)`` logits, float32 math."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    log_r = F.log_softmax(reference_logits.float(), dim=-1)
    log_m = F.log_softmax(logits.float(), dim=-1)
    return float((log_r.exp() * (log_r - log_m)).sum(-1).mean())


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions where both argmax (greedy) next tokens are the same."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    return float((reference_logits.argmax(-1) == logits.argmax(-1)).float().mean())


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """``exp`` of the mean next-token cross-entropy; ``logits[t]`` predicts ``labels[t]``."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {labels.shape[0]} labels")
    return math.exp(float(F.cross_entropy(logits, labels)))


def needle_recall(answer: str, values: list[str]) -> float:
    """Fraction of the expected ``values`` (digit strings) that appear as whole numbers in ``answer``.

    Numbers are read as maximal digit runs, so ``"12345"`` does not count as ``"1234"``; a value
    found once counts once.
    """
    if not values:
        raise ValueError("needle_recall needs at least one expected value")
    found = set(re.findall(r"\d+", answer))
    return sum(v in found for v in values) / len(values)
