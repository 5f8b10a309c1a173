"""Loss pieces of DMS retrofitting (DESIGN.md §2, "Distillation")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

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

    ``forward`` is KL(teacher ‖ student) = Σ p_t (log p_t − log p_s) (mass-covering; the metric we
    report); ``reverse`` is KL(student ‖ teacher). ``valid`` (B, T) masks padding and separators.
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
        log_s = F.log_softmax(s_flat[sl].float(), dim=-1)
        log_t = F.log_softmax(t_flat[sl].float().detach(), dim=-1)
        if direction == "forward":
            kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        elif direction == "reverse":
            kl = (log_s.exp() * (log_s - log_t)).sum(-1)
        else:
            raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
        total = total + (kl * weights[sl]).sum()
    return total / weights.sum().clamp_min(1.0)
