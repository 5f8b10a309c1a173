"""Loss pieces of DMS retrofitting (docs/design.md §2, "Distillation")."""

from __future__ import annotations

from typing import Literal

import torch

from ..nn.divergence import kl_per_token

__all__ = ["compression_loss", "distillation_kl", "target_compression_ratio", "target_eviction_rate"]


def target_compression_ratio(step: int, cr_start: float, cr_end: float, anneal_steps: int) -> float:
    """Linear schedule ``cr(step) = cr0 + (cr1 - cr0) * min(step / S, 1)``."""
    if anneal_steps <= 0:
        return float(cr_end)
    return float(cr_start + (cr_end - cr_start) * min(step / anneal_steps, 1.0))


def target_eviction_rate(step: int, cr_start: float, cr_end: float, anneal_steps: int) -> float:
    """``f*(step) = 1 - 1 / cr(step)``: the eviction rate that yields the scheduled ratio."""
    return 1.0 - 1.0 / target_compression_ratio(step, cr_start, cr_end, anneal_steps)


def compression_loss(eviction_rates: torch.Tensor, target_rate: float) -> torch.Tensor:
    """One-sided ``mean_b max(0, f* - f_b)``: only under-eviction is penalised."""
    return torch.clamp(target_rate - eviction_rates, min=0.0).mean()


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    direction: Literal["forward", "reverse"] = "forward",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean per-token KL over the vocabulary, computed in float32 chunks of positions.

    ``forward`` is KL(teacher ‖ student) (mass-covering; the metric we report); ``reverse`` is
    KL(student ‖ teacher); see :func:`modelopt_dms.nn.divergence.kl_per_token`. ``valid`` (B, T)
    masks padding and separators.
    """
    bsz, seq, vocab = student_logits.shape
    s_flat = student_logits.reshape(-1, vocab)
    t_flat = teacher_logits.reshape(-1, vocab)
    weights = (
        torch.ones(bsz * seq, device=s_flat.device)
        if valid is None
        else valid.reshape(-1).to(s_flat.device, torch.float32)
    )
    total = s_flat.new_zeros((), dtype=torch.float32)
    for start in range(0, s_flat.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        kl = kl_per_token(t_flat[sl].detach(), s_flat[sl], direction=direction)
        total = total + (kl * weights[sl]).sum()
    return total / weights.sum().clamp_min(1.0)
