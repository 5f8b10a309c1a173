"""Distillation KL straight from final hidden states: lm_head + log-softmax + KL, chunked, recomputed.

``fused_head_kl(student_hidden, teacher, weight, valid)`` equals
``distillation_kl(student_hidden @ W.T, teacher_hidden @ W.T, valid)`` (forward KL(teacher ‖ student)
per token, float32 math) but never holds more than ``chunk`` rows of logits: each chunk's logits
exist only while its KL and its gradient ``w_row (softmax(s) - softmax(t)) @ W`` are formed (in the
forward: the loss is linear in its output, so nothing needs recomputing); the gradient w.r.t. the
hidden states is kept (``O(tokens × hidden)``). Memory for logits is O(chunk × vocab) for both models
instead of O(tokens × vocab).

The teacher is given as hidden states (the same ``weight`` makes its logits) or as a cached top-k
distribution (:class:`TopKTeacher`, the approximation the teacher cache uses; :func:`topk_kl` is
its unfused form).
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


def _softmax_and_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax`` (one pass of exp) and the row log-sum-exp read off it.

    At the row's argmax ``m`` the probability is ``exp(0) / Z``, so ``lse = m - log(q[argmax])``
    needs no second pass over the vocabulary.
    """
    top, where = logits.max(dim=-1, keepdim=True)
    q = torch.softmax(logits, dim=-1)
    return q, (top - q.gather(-1, where).log()).squeeze(-1)


def _kl_and_grad_full(
    s_logits: torch.Tensor, t_logits: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(t ‖ s) (float32) and ``w`` times d KL / d student logits = softmax(s) - softmax(t).

    KL = Σ p_t (t - s) - (lse_t - lse_s), so neither log-softmax is materialised.
    """
    s_logits, t_logits = s_logits.float(), t_logits.float()
    q, lse_s = _softmax_and_lse(s_logits)
    p_t, lse_t = _softmax_and_lse(t_logits)
    kl = (p_t * (t_logits - s_logits)).sum(-1) - (lse_t - lse_s)
    return kl, q.sub_(p_t).mul_(w[:, None])


def _kl_and_grad_topk(
    s_logits: torch.Tensor, t: TopKTeacher, rows: slice, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL_k(t ‖ s) and ``w`` times its gradient ``q - target``.

    The target is the teacher's top-k probabilities on its top-k tokens and ``p_tail * q_j / q_tail``
    on the others (the teacher's tail mass spread like the student's), so the gradient is
    ``q (1 - p_tail / q_tail)`` off the top-k and ``q - p`` on it: formed in place in ``q``.
    """
    s_logits = s_logits.float()
    q, lse = _softmax_and_lse(s_logits)
    t_lp, t_idx, t_tail = t.logprobs[rows].float(), t.indices[rows], t.tail[rows].float()
    q_top = q.gather(-1, t_idx)
    log_q_top = s_logits.gather(-1, t_idx) - lse[:, None]
    q_tail = (1.0 - q_top.sum(-1)).clamp_min(1e-7)  # the floor topk_kl has: below it fp32 is noise
    p_top, p_tail = t_lp.exp(), t_tail.exp()
    kl = (p_top * (t_lp - log_q_top)).sum(-1) + p_tail * (t_tail - q_tail.log())
    grad = q.mul_(((1.0 - p_tail / q_tail) * w)[:, None])
    return kl, grad.scatter_(-1, t_idx, (q_top - p_top) * w[:, None])


class _HeadKL(torch.autograd.Function):
    """KL of ``hidden @ weight.T`` logits against a teacher, with the gradient formed in the forward.

    The loss is linear in its scalar output, so ``d loss / d hidden`` (and ``/ d weight``) is
    computed chunk by chunk while the logits exist and kept (``O(N x H)``); backward only scales it.
    No logits survive a chunk: memory is ``O(chunk x V)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher, weights, chunk):  # noqa: D102
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                s_logits = hidden[rows] @ weight.T
                w = weights[rows]
                if isinstance(teacher, TopKTeacher):
                    kl, g = _kl_and_grad_topk(s_logits, teacher, rows, w)
                else:
                    kl, g = _kl_and_grad_full(s_logits, teacher[rows] @ weight.T, w)
                total = total + (kl * w).sum()
                if grad_hidden is not None:
                    grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += g.T @ hidden[rows].float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else hidden.new_zeros(0),
            grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_zeros(0),
        )
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if ctx.has[0] else None
        gw = grad_weight * grad_out.to(grad_weight.dtype) if ctx.has[1] else None
        return gh, gw, None, None, None


def _weights(valid: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if valid is None:
        return torch.ones(n, device=device, dtype=torch.float32)
    return valid.reshape(-1).to(device, torch.float32)


def fused_head_kl(
    student_hidden: torch.Tensor,
    teacher: torch.Tensor | TopKTeacher,
    weight: torch.Tensor,
    valid: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of ``hidden @ weight.T`` logits, chunked.

    Args:
        student_hidden: ``(B, T, H)`` final hidden states (after the last norm).
        teacher: the teacher's final hidden states ``(B, T, H)`` (same ``weight``), or a cached
            :class:`TopKTeacher` of ``B * T`` rows (then the KL is KL_k).
        weight: the lm_head weight ``(V, H)`` (gradients flow into it only if it requires them).
        valid: ``(B, T)`` weights of the positions (padding, cut positions: 0); default all 1.
        chunk: rows of logits computed at a time.

    """
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    if not isinstance(teacher, TopKTeacher):
        teacher = teacher.detach().reshape(-1, teacher.shape[-1])
    w = _weights(valid, h.shape[0], h.device)
    total = _HeadKL.apply(h, weight, teacher, w, chunk)
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
