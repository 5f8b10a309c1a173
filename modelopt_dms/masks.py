"""DMS attention masks and the masked dense attention they feed (DESIGN.md §2).

Shapes: decisions and logits are ``(batch, kv_heads, positions)``; masks and biases are
``(batch, kv_heads, queries, keys)`` and are shared by the query heads of a GQA group.
Key ``k`` is governed by the decision emitted at position ``k + 1``; the newest key is pending.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "hard_visibility",
    "soft_eviction_bias",
    "grouped_attention",
]


def _shifted(x: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """Return ``y`` with ``y[..., k] = x[..., k + 1]`` and the last entry set to ``fill``."""
    pad = torch.full_like(x[..., :1], fill)
    return torch.cat([x[..., 1:], pad], dim=-1)


def _offsets(q_pos: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``q - k`` for query positions ``q_pos`` (length Tq) against keys ``0..num_keys-1``."""
    k_pos = torch.arange(num_keys, device=q_pos.device)
    return q_pos[:, None] - k_pos[None, :]


def hard_visibility(
    decisions: torch.Tensor, window_size: int, q_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Inference mask: key ``k`` visible to query ``q`` iff ``k <= q`` and not evicted.

    Args:
        decisions: ``(B, H, Tk)`` boolean decisions ``d_t`` of every key position ``t``.
        window_size: ``w``; a flagged key stays visible while ``q - k <= w``.
        q_positions: absolute positions of the queries (default: the last ``Tk`` ... i.e. all).

    Returns:
        ``(B, H, Tq, Tk)`` boolean mask (True = visible). Padding is not handled here.

    """
    num_keys = decisions.shape[-1]
    if q_positions is None:
        q_positions = torch.arange(num_keys, device=decisions.device)
    diff = _offsets(q_positions, num_keys)  # (Tq, Tk)
    evicted_after_window = _shifted(decisions.bool(), False)[..., None, :] & (diff > window_size)
    return (diff >= 0) & ~evicted_after_window


def soft_eviction_bias(z: torch.Tensor, window_size: int) -> torch.Tensor:
    """Training bias added to the scaled scores (full sequence, no past).

    ``-inf`` on non-causal positions, ``0`` inside the window (``q - k <= w``), and
    ``log(1 - sigmoid(z_{k+1}))`` beyond it. ``z`` is ``(B, H, T)``; returns ``(B, H, T, T)``.
    """
    num = z.shape[-1]
    diff = _offsets(torch.arange(num, device=z.device), num)
    log_keep = F.logsigmoid(-_shifted(z, float("-inf")))  # pending last key: log(1 - 0) = 0
    bias = torch.where(diff > window_size, log_keep[..., None, :], torch.zeros_like(log_keep)[..., None, :])
    return bias.masked_fill(diff < 0, float("-inf"))


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager GQA attention with a per-KV-head mask and/or bias shared across each group.

    Args:
        query: ``(B, Hq, Tq, D)``; key, value: ``(B, Hkv, Tk, D)``.
        mask: boolean, broadcastable to ``(B, Hkv, Tq, Tk)``; True = visible.
        bias: float, broadcastable to ``(B, Hkv, Tq, Tk)``; added to the scaled scores.

    Returns:
        ``(B, Tq, Hq, D)`` (the layout attention modules reshape into ``o_proj``). Query rows that
        see no key return zeros.

    """
    bsz, num_q_heads, q_len, head_dim = query.shape
    num_kv = key.shape[1]
    group = num_q_heads // num_kv
    q = query.view(bsz, num_kv, group, q_len, head_dim)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).to(acc) * scaling
    if bias is not None:
        scores = scores + bias.to(acc).unsqueeze(2)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isinf(row_max) & (row_max < 0)
    scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0).to(value.dtype)
    out = torch.matmul(probs, value.unsqueeze(2))  # (B, Hkv, G, Tq, D)
    return out.reshape(bsz, num_q_heads, q_len, head_dim).transpose(1, 2)
