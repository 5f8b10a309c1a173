"""The training attention through ``flex_attention``: the soft delayed-eviction bias as a ``score_mod``.

Equal to :func:`~modelopt_dms.nn.masks.grouped_attention` with
:func:`~modelopt_dms.nn.masks.soft_eviction_bias` (the eager path, kept as the CPU fallback and the
test oracle), without materialising a ``T x T`` bias or softmax: the score of query ``q`` for key
``k`` gets ``log(1 - sigmoid(z_{next(k)}))`` once ``q - k > w`` (distances in real tokens), and a
block mask keeps the causal / document / padding structure of the model's mask. Gradients reach
``z`` through the captured tensor. Compiled, it is the memory-efficient kernel on CUDA; on CPU the
forward runs (uncompiled) but its backward does not, so training there uses the eager path.
"""

from __future__ import annotations

import torch

from .masks import log_keep_probability
from .memo import LastForTensor

__all__ = ["flex_training_attention"]

_COMPILED = {}
_CAUSAL_BLOCK_MASK: list = [None]  # ((batch, length, device), block mask) of the last causal build
_MASK_BLOCK_MASK = LastForTensor()  # the block mask of the last model mask


def _block_mask(create_block_mask, visible: torch.Tensor | None, bsz: int, t: int, device: torch.device):
    """The block mask of the causal / model mask, built once while the same mask comes back.

    Causal (``visible`` None) is a pure function of (batch, length, device); a model mask is matched
    by identity and version (the layers of a forward share one ``visible``:
    :func:`~modelopt_dms.nn.attention._training_masks`).
    """
    if visible is None:
        key = (bsz, t, str(device))
        if _CAUSAL_BLOCK_MASK[0] is not None and _CAUSAL_BLOCK_MASK[0][0] == key:
            return _CAUSAL_BLOCK_MASK[0][1]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, bsz, None, t, t, device=device)
        _CAUSAL_BLOCK_MASK[0] = (key, block_mask)
        return block_mask

    vis = visible[:, 0]

    def masked(b, h, q_idx, kv_idx):
        return vis[b, q_idx, kv_idx] & (q_idx >= kv_idx)

    return _MASK_BLOCK_MASK.get(
        visible, (bsz, t), lambda: create_block_mask(masked, bsz, None, t, t, device=device)
    )


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


def flex_training_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    z: torch.Tensor,
    window: int,
    scaling: float,
    visible: torch.Tensor | None,
    valid: torch.Tensor | None,
    cont: torch.Tensor | None,
    compile: bool = True,
) -> torch.Tensor:
    """The soft-eviction training attention; returns ``(B, T, Hq, D)``.

    ``z``: ``(B, Hkv, T)`` relaxed decision logits; ``visible``: the model's mask as ``(B, 1, T, T)``
    booleans (None: causal); ``valid``: ``(B, T)`` real tokens; ``cont``: where packed documents end.
    """
    flex_attention, create_block_mask = _flex()
    bsz, hq, t, _ = query.shape
    group = hq // key.shape[1]
    log_keep = log_keep_probability(z, valid, cont)  # (B, Hkv, T); pending: 0
    real_pos = (
        valid.long().cumsum(-1) - 1 if valid is not None else torch.arange(t, device=z.device).expand(bsz, t)
    )

    def score_mod(score, b, h, q_idx, kv_idx):
        far = (real_pos[b, q_idx] - real_pos[b, kv_idx]) > window
        return torch.where(far, score + log_keep[b, h // group, kv_idx], score)

    block_mask = _block_mask(create_block_mask, visible, bsz, t, query.device)
    fn = flex_attention
    if compile and query.device.type == "cuda":
        fn = _COMPILED.setdefault("flex", torch.compile(flex_attention, dynamic=False))
    out = fn(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)
