"""The CPU training attention of unpadded, unpacked rows: the window band and the far part, merged.

Equal to :func:`~modelopt_dms.nn.masks.grouped_attention` with
:func:`~modelopt_dms.nn.masks.soft_eviction_bias` (the eager oracle) when every token is real and
there is one document per row (no ``valid``, ``visible`` or ``cont``). A query at ``t`` sees two
disjoint key sets:

* the *near* band ``[t - w, t]`` without a bias: scores of each block of ``w + 1`` queries against
  the two key blocks that hold their band, in batched matmuls (``O(T w)`` work and memory);
* the *far* keys ``[0, t - w - 1]`` with the bias ``log(1 - sigmoid(z_{next(k)}))``: one causal
  flash-attention call of the queries ``w + 1 ...`` over the keys ``... T - w - 2`` (top-left
  causal is exactly ``k <= t - w - 1``), the bias as one extra key channel (queries get a channel
  of ones), so the kernel skips the upper triangle and never builds a ``T x T`` tensor.

The two parts merge by their log-sum-exp. The backward of the far part is the flash backward with
the *merged* output and log-sum-exp (as in blockwise/ring attention, its probabilities are then the
global ones), so no gradient has to pass through the kernel's log-sum-exp output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["split_training_attention", "supports_split"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def supports_split(query: torch.Tensor, window: int, visible, valid, cont) -> bool:
    """Whether :func:`split_training_attention` applies.

    It does on the CPU for rows without padding or packed documents that are longer than the window
    (a shorter row has no far part, and its decisions would get no gradient).
    """
    plain = visible is None and valid is None and cont is None
    return plain and query.device.type == "cpu" and query.shape[2] > window + 1


class _MergeWithFar(torch.autograd.Function):
    """The output ``(B, Hq, T, D)``: the near part, merged with the far part after ``n`` queries.

    The far part is one causal flash-attention call with the bias channel (``D + 1`` channels).
    """

    @staticmethod
    def forward(ctx, q_far, k_far, v_far, near_out, near_lse, n: int, scaling: float):
        far_out, far_lse = _FLASH(q_far, k_far, v_far, 0.0, True, scale=scaling)  # D + 1 channels
        lse = torch.logaddexp(far_lse, near_lse[:, :, n:])
        merged = far_out * (far_lse - lse).exp()[..., None]
        merged[..., :-1] += near_out[:, :, n:] * (near_lse[:, :, n:] - lse).exp()[..., None]
        merged = merged.to(q_far.dtype)
        ctx.save_for_backward(q_far, k_far, v_far, near_out, near_lse, merged, lse)
        ctx.n, ctx.scaling = n, scaling
        return torch.cat([near_out[:, :, :n].to(q_far.dtype), merged[..., :-1]], dim=2)

    @staticmethod
    def backward(ctx, grad):
        q_far, k_far, v_far, near_out, near_lse, merged, lse = ctx.saved_tensors
        n = ctx.n
        grad_far = F.pad(grad[:, :, n:], (0, 1))  # the extra channel's output is 0
        dq, dk, dv = _FLASH_BACKWARD(grad_far, q_far, k_far, v_far, merged, lse, 0.0, True, scale=ctx.scaling)
        share = (near_lse[:, :, n:] - lse).exp()  # the near part's share of the softmax mass
        d_near_out = grad.clone()
        d_near_out[:, :, n:] *= share[..., None]
        d_near_lse = torch.zeros_like(near_lse)
        d_near_lse[:, :, n:] = share * (grad[:, :, n:] * (near_out[:, :, n:] - merged[..., :-1])).sum(-1)
        return dq, dk, dv, d_near_out, d_near_lse, None, None


def _near_band(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, scaling: float):
    """Attention of each query over its band ``[t - w, t]``: ``(out (B, Hq, T, D), lse (B, Hq, T))``.

    Queries run in blocks of ``n = w + 1``; the band of block ``c`` lies in key blocks ``c - 1`` and
    ``c``, so one batched matmul per layer scores ``(n, 2n)`` per block.
    """
    bsz, num_q, t, dim = query.shape
    num_kv = key.shape[1]
    n = window + 1
    blocks = -(-t // n)
    tail = blocks * n - t
    q = F.pad(query, (0, 0, 0, tail)).view(bsz, num_kv, num_q // num_kv, blocks, n, dim)
    k = F.pad(key, (0, 0, n, tail)).view(bsz, num_kv, blocks + 1, n, dim)
    v = F.pad(value, (0, 0, n, tail)).view(bsz, num_kv, blocks + 1, n, dim)
    k2 = torch.cat([k[:, :, :-1], k[:, :, 1:]], dim=3)  # (B, Hkv, C, 2n, D): blocks c - 1 and c
    v2 = torch.cat([v[:, :, :-1], v[:, :, 1:]], dim=3)
    scores = torch.einsum("bhgcid,bhcjd->bhgcij", q, k2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling  # bf16: fp32 scores
    i = torch.arange(n, device=query.device)
    j = torch.arange(2 * n, device=query.device)
    block = torch.arange(blocks, device=query.device)
    # key slot j of block c sits at (c - 1) n + j: distance n + i - j, inside the band for
    # i + 1 <= j <= i + n; block 0's first half is the padding in front of the row
    outside = (j[None, :] <= i[:, None]) | (j[None, :] > i[:, None] + n)
    outside = outside[None] | ((block[:, None, None] == 0) & (j[None, None, :] < n))  # (C, n, 2n)
    scores = scores.masked_fill(outside, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp()
    out = torch.einsum("bhgcij,bhcjd->bhgcid", probs.to(v2.dtype), v2)
    out = out.reshape(bsz, num_q, blocks * n, dim)[:, :, :t]
    return out, lse.reshape(bsz, num_q, blocks * n)[:, :, :t]


def split_training_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_keep: torch.Tensor,
    window: int,
    scaling: float,
) -> torch.Tensor:
    """The soft-eviction training attention of whole real rows; returns ``(B, T, Hq, D)``.

    ``log_keep``: ``(B, Hkv, T)`` the bias of each key beyond the window
    (:func:`~modelopt_dms.nn.masks.log_keep_probability`).
    """
    t = query.shape[2]
    n = window + 1
    if t <= n:
        raise ValueError(f"split_training_attention needs rows longer than the window + 1 ({n}); got {t}")
    near_out, near_lse = _near_band(query, key, value, window, scaling)
    ones = query.new_ones(query.shape[:-1] + (1,))[:, :, n:]
    q_far = torch.cat([query[:, :, n:], ones], dim=-1)
    channel = (log_keep[:, :, : t - n] / scaling).to(key.dtype)[..., None]
    k_far = torch.cat([key[:, :, : t - n], channel], dim=-1)
    v_far = F.pad(value[:, :, : t - n], (0, 1))
    out = _MergeWithFar.apply(q_far, k_far, v_far, near_out, near_lse, n, scaling)
    return out.transpose(1, 2)
