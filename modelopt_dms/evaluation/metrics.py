"""The metrics every evaluation reports (demo, heads evaluation, kvpress comparison).

Pure functions of logits, ids and text. KL is :mod:`modelopt_dms.nn.divergence` (the same code as
the training loss); retrieval answers are scored by :func:`needle_recall` only.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ..nn.divergence import kl_per_token, mean_kl

__all__ = ["kl_per_token", "mean_kl", "needle_recall", "perplexity", "top1_agreement", "wilson_interval"]


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


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% for ``z = 1.96``); ``(0, 1)`` when ``n == 0``.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n: 3 of 3
    pass keys is ``(0.44, 1.0)``, 24 of 24 is ``(0.86, 1.0)``.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
