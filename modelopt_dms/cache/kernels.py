"""Attention of new queries over a DMS cache layer's slots (GQA folded, one call per layer).

Queries ``(B, Hq, m, D)`` read KV head ``h = j // G``. Keys come in *parts* (the stored slots, the
new tokens), each with a boolean visibility mask ``(B, H, m, n)`` shared by the G query heads of a
KV head. Query rows that see no key return zeros.

* :func:`sdpa_parts`: the parts are concatenated and one fused ``scaled_dot_product_attention``
  runs with the GQA group folded into the batch (keys broadcast over the group, no copy).
* :func:`blockwise_parts`: for FP8 storage (or any part given as a block reader): keys and values
  are dequantised one block of slots at a time and merged by log-sum-exp, so no full-precision
  copy of a whole row is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = ["blockwise_parts", "decode_attention", "sdpa_parts"]

Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys (B,H,n,D), values, mask (B,H,m,n)


def _fold(query: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hq, m, D) -> (B * H, G, m, D)."""
    bsz, hq, m, d = query.shape
    return query.reshape(bsz * heads, hq // heads, m, d)


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One new token per row: the GQA group goes on the query axis, so nothing is expanded.

    ``query`` ``(B, Hq, 1, D)``; ``keys``/``values`` ``(B, H, n, D)``; ``mask`` ``(B, H, 1, n)``, one
    row per KV head that the G queries of the group share, with at least one visible key per row.
    Returns ``(B, Hq, 1, D)``.
    """
    bsz, hq, _, d = query.shape
    heads = keys.shape[1]
    q = query.reshape(bsz, heads, hq // heads, d)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(bsz, hq, 1, -1)


def sdpa_parts(
    query: torch.Tensor, parts: list[Part], scaling: float, non_empty: bool = False
) -> torch.Tensor:
    """One fused SDPA over the concatenated parts; returns ``(B, Hq, m, D)``.

    ``non_empty``: the caller guarantees every query row sees at least one key (skips the guard).
    """
    bsz, hq, m, d = query.shape
    heads = parts[0][0].shape[1]
    group = hq // heads
    if len(parts) == 1:
        keys, values, mask = parts[0]
    else:
        keys = torch.cat([p[0] for p in parts], dim=2)
        values = torch.cat([p[1] for p in parts], dim=2)
        mask = torch.cat([p[2] for p in parts], dim=-1)
    n = keys.shape[2]
    if n == 0:
        return query.new_zeros(query.shape)
    seen_any = None
    if not non_empty:
        seen_any = mask.any(-1, keepdim=True)  # (B, H, m, 1)
        first = torch.zeros_like(mask)
        first[..., 0] = True
        mask = mask | (first & ~seen_any)  # rows that see nothing: a dummy key, zeroed below
    q = _fold(query, heads)
    k = keys.reshape(bsz * heads, 1, n, d).expand(-1, group, -1, -1)
    v = values.reshape(bsz * heads, 1, n, values.shape[-1]).expand(-1, group, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(bsz * heads, 1, m, n), scale=scaling)
    if seen_any is not None:
        out = out * seen_any.reshape(bsz * heads, 1, m, 1).to(out.dtype)
    return out.reshape(bsz, hq, m, -1)


def blockwise_parts(
    query: torch.Tensor,
    parts: Iterable[Part | Callable[[], Part]],
    scaling: float,
    heads: int,
) -> torch.Tensor:
    """Attention over parts read one at a time, merged by log-sum-exp in float32.

    A part may be a zero-argument reader. Returns ``(B, Hq, m, D)`` in the query dtype.
    """
    bsz, hq, m, d = query.shape
    group = hq // heads
    q = query.reshape(bsz, heads, group, m, d).float()
    run_max = q.new_full((bsz, heads, group, m), float("-inf"))
    run_sum = q.new_zeros((bsz, heads, group, m))
    acc = None
    for part in parts:
        keys, values, mask = part() if callable(part) else part
        if keys.shape[2] == 0:
            continue
        scores = torch.einsum("bhgmd,bhnd->bhgmn", q, keys.float()) * scaling
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        new_max = torch.maximum(run_max, scores.amax(-1))
        safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(scores - safe[..., None])
        rescale = torch.exp(run_max - safe)
        run_sum = run_sum * rescale + probs.sum(-1)
        contrib = torch.einsum("bhgmn,bhnd->bhgmd", probs, values.float())
        acc = contrib if acc is None else acc * rescale[..., None] + contrib
        run_max = new_max
    if acc is None:
        return query.new_zeros(query.shape)
    out = acc / run_sum.clamp_min(1e-30)[..., None]
    out = torch.where((run_sum > 0)[..., None], out, torch.zeros_like(out))
    return out.reshape(bsz, hq, m, -1).to(query.dtype)
