"""Distillation KL straight from final hidden states: lm_head + log-softmax + KL, chunked, recomputed.

``fused_head_kl(student_hidden, teacher, weight, valid)`` equals
``distillation_kl(student_hidden @ W.T, teacher_hidden @ W.T, valid)`` (forward KL(teacher ‖ student)
per token, float32 math) but never holds more than ``chunk`` rows of logits: the forward keeps
nothing of the logits, and the backward recomputes each chunk's student and teacher logits to form
``d loss / d logits = w_row (softmax(s) - softmax(t))``. Memory for logits is O(chunk × vocab) for
both models instead of O(tokens × vocab).

The teacher is given as hidden states (the same ``weight`` makes its logits). :func:`topk_kl` is the
KL against a cached top-k teacher distribution (:class:`TopKTeacher`), the approximation the teacher
cache uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TopKTeacher", "fused_head_kl", "topk_kl"]


@dataclass
class TopKTeacher:
    """A cached teacher distribution per position: its ``k`` largest log-probabilities and the rest.

    ``logprobs`` / ``indices``: ``(N, k)``; ``tail``: ``(N,)`` = log(1 − Σ top-k probabilities).
    The KL against it, KL_k(t ‖ s) = Σ_{i∈top-k} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)
    with q_tail = 1 − Σ_{i∈top-k} q_i, is the KL of the two distributions with the tail merged into
    one outcome: it never exceeds the full KL and equals it when the teacher's tail is empty.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor


def _chunk_kl_and_grad(s_logits: torch.Tensor, t_logits: torch.Tensor, want_grad: bool):
    """Per-row KL(t ‖ s) of a chunk (float32) and, if asked, d KL / d student logits."""
    log_s = torch.log_softmax(s_logits.float(), dim=-1)
    log_t = torch.log_softmax(t_logits.float(), dim=-1)
    p_t = log_t.exp()
    kl = (p_t * (log_t - log_s)).sum(-1)
    return kl, (log_s.exp() - p_t) if want_grad else None


class _FusedHeadKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, weights, chunk):  # noqa: D102
        n = hidden.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                s_logits = hidden[rows] @ weight.T
                t = teacher_hidden[rows] @ weight.T
                kl, _ = _chunk_kl_and_grad(s_logits, t, False)
                total = total + (kl * weights[rows]).sum()
        ctx.save_for_backward(hidden, weight, teacher_hidden, weights)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, teacher_hidden, weights = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        chunk = ctx.chunk
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                s_logits = hidden[rows] @ weight.T
                t = teacher_hidden[rows] @ weight.T
                _, g = _chunk_kl_and_grad(s_logits, t, True)
                g = g * (weights[rows] * grad_out)[:, None]
                if grad_hidden is not None:
                    grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += g.T @ hidden[rows].float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_head_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of ``hidden @ weight.T`` logits, chunked and recomputed.

    Args:
        student_hidden / teacher_hidden: ``(B, T, H)`` final hidden states (after the last norm).
        weight: the lm_head weight ``(V, H)`` (gradients flow into it only if it requires them).
        valid: ``(B, T)`` weights of the positions (padding, cut positions: 0); default all 1.
        chunk: rows of logits computed at a time.

    """
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    w = (
        torch.ones(h.shape[0], device=h.device, dtype=torch.float32)
        if valid is None
        else valid.reshape(-1).to(h.device, torch.float32)
    )
    total = _FusedHeadKL.apply(h, weight, t, w, chunk)
    return total / w.sum().clamp_min(1.0)


def topk_kl(
    student_logits: torch.Tensor, teacher: TopKTeacher, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean per-token KL_k(teacher ‖ student) against a cached top-k teacher (see :class:`TopKTeacher`)."""
    s = student_logits.reshape(-1, student_logits.shape[-1])
    w = (
        torch.ones(s.shape[0], device=s.device)
        if valid is None
        else valid.reshape(-1).to(s.device, torch.float32)
    )
    log_s = torch.log_softmax(s.float(), dim=-1)
    s_top = log_s.gather(-1, teacher.indices)
    q_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-7))
    p_top, p_tail = teacher.logprobs.float().exp(), teacher.tail.float().exp()
    kl = (p_top * (teacher.logprobs.float() - s_top)).sum(-1) + p_tail * (teacher.tail.float() - q_tail)
    return (kl * w).sum() / w.sum().clamp_min(1.0)
