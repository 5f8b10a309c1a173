"""The training attention through fused SDPA kernels: the soft eviction bias as one extra key channel.

Equal to :func:`~modelopt_dms.nn.masks.grouped_attention` with
:func:`~modelopt_dms.nn.masks.soft_eviction_bias` (the eager oracle) without a ``T x T`` bias,
score or softmax tensor. The bias ``log(1 - sigmoid(z_{next(k)}))`` of a key ``k`` beyond the
window depends on the key only, so it is a dot product: queries get a channel of ones and each key
two copies, a *far* copy whose channel holds ``bias_k / scaling`` and a *near* copy whose channel
is 0. A query sees the far copy of the keys more than ``w`` real tokens back and the near copy of
those within the window; one softmax over both is exactly the biased attention.

Queries run in blocks: block ``[a, e)`` reads the far copies of keys before ``e - w - 1`` and the
near copies of ``[a - w, e)`` (all keys ``< e`` when padding stretches real distances), one
:func:`torch.nn.functional.scaled_dot_product_attention` call each with a boolean mask, so the
work is about one causal attention plus a band, in the fused kernel (CPU flash attention has a
backward; flex attention's does not run on CPU). Gradients reach ``z`` through the key channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import _row_offsets, log_keep_probability

__all__ = ["sdpa_training_attention"]


def _block_size(num: int) -> int:
    """Queries per SDPA call: small blocks skip more of the causal upper triangle."""
    return max(64, num // 8)


def sdpa_training_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: torch.Tensor,
    window: int,
    scaling: float,
    visible: torch.Tensor | None,
    valid: torch.Tensor | None,
    cont: torch.Tensor | None,
) -> torch.Tensor:
    """The soft-eviction training attention; returns ``(B, T, Hq, D)``.

    ``z``: ``(B, Hkv, T)`` relaxed decision logits; ``visible``: the model's mask as ``(B, 1, T, T)``
    booleans (None: causal); ``valid``: ``(B, T)`` real tokens; ``cont``: where packed documents end.
    Queries that see no key (padding) return zeros, as in the eager kernel.
    """
    bsz, num_q, t, dim = query.shape
    log_keep = log_keep_probability(z, valid, cont)  # (B, Hkv, T); pending: 0
    channel = (log_keep / scaling).to(key.dtype)[..., None]
    q_x = torch.cat([query, query.new_ones(bsz, num_q, t, 1)], dim=-1)
    far_k = torch.cat([key, channel], dim=-1)
    near_k = torch.cat([key, torch.zeros_like(channel)], dim=-1)
    v_x = torch.cat([value, value.new_zeros(value.shape[:-1] + (1,))], dim=-1)
    block = _block_size(t)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        far_end = end if valid is not None else max(0, end - window - 1)
        near_start = 0 if valid is not None else max(0, start - window)
        q_idx = torch.arange(start, end, device=query.device)
        head = valid[:, :end] if valid is not None else None
        diff, _ = _row_offsets(end, q_idx, head, query.device)  # (B|1, block, end); -1: not visible
        far, near = diff[..., :far_end] > window, (diff >= 0) & (diff <= window)
        near = near[..., near_start:]
        if visible is not None:
            seen = visible[:, 0, start:end, :end]
            far, near = far & seen[..., :far_end], near & seen[..., near_start:]
        far, near = far.expand(bsz, -1, -1), near.expand(bsz, -1, -1)
        empty = ~(far.any(-1) | near.any(-1))  # (B, block): padding queries
        itself = torch.arange(near_start, end, device=query.device) == q_idx[:, None]
        near = near | (empty[..., None] & itself)  # a key to attend to; the output is zeroed below
        keys = torch.cat([far_k[:, :, :far_end], near_k[:, :, near_start:end]], dim=2)
        values = torch.cat([v_x[:, :, :far_end], v_x[:, :, near_start:end]], dim=2)
        mask = torch.cat([far, near], dim=-1)[:, None]
        out = F.scaled_dot_product_attention(
            q_x[:, :, start:end], keys, values, attn_mask=mask, scale=scaling, enable_gqa=True
        )
        outs.append(out.masked_fill(empty[:, None, :, None], 0.0))
    return torch.cat(outs, dim=2)[..., :dim].transpose(1, 2)
