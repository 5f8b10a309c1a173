"""The DMS cache: a transformers ``Cache`` whose layers store only the tokens DMS keeps.

Following transformers' Cache / cache-layer split, :class:`DMSCache` is a list of per-layer
objects: a :class:`~modelopt_dms.cache.layer.DMSCacheLayer` for every DMS attention layer (its own
tensors over (batch row, KV head), its own statistics) and a plain ``DynamicLayer`` for layers DMS
did not convert. Layers are created lazily, in layer order, by the first forward.

Row invariant (docs/design.md §2), per (layer, batch row, KV head) after ``n`` real tokens: the
``w + 1`` newest tokens are kept; an older token ``k`` is kept iff ``d_{k+1} = 0``; the newest token's
flag is pending until the next real token of that row arrives (also across chunks and turns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..nn.dtypes import as_dtype
from ..nn.masks import diagonal_validity
from .layer import DMSCacheLayer

__all__ = ["DMSCache", "DMSLayerAdapter", "cache_stats"]

LAYOUTS = ("blocked", "paged")


class DMSLayerAdapter(CacheLayerMixin):
    """The transformers cache-layer face of a :class:`DMSCacheLayer` (lengths, beams, no ``update``)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer: DMSCacheLayer) -> None:
        super().__init__()
        self.dms = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # noqa: D102
        return None

    def update(self, key_states, value_states, cache_kwargs=None):  # noqa: D102
        raise RuntimeError("DMS layers are written through DMSCache.dms_attend, not update().")

    def get_seq_length(self) -> int:
        """Logical length: tokens passed in so far (padding included), like a dense cache."""
        return self.dms.logical

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """Masks cover the logical sequence; DMS layers only read the padding of new tokens."""
        return self.dms.logical + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        """No maximum: rows grow as needed."""
        return -1

    def reset(self) -> None:  # noqa: D102
        self.dms.__init__(
            self.dms.window,
            self.dms.layout,
            self.dms.block_size,
            self.dms.page_size,
            self.dms.prefill_chunk_size,
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``."""
        self.dms.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:  # noqa: D102
        self.dms.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """``num_return_sequences`` / beams: every row repeated ``repeats`` times, in place."""
        if self.dms.book is not None:
            index = torch.arange(self.dms.book.batch, device=self.dms.book.seen.device)
            self.dms.select_rows(index.repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:  # noqa: D102
        raise NotImplementedError("DMSCache cannot be cropped (evicted tokens are gone).")


class _PendingLayer(CacheLayerMixin):
    """A layer index not reached yet (layers are created by their first call, in any order)."""

    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:  # noqa: D102
        return None

    def update(self, key_states, value_states, cache_kwargs=None):  # noqa: D102
        raise RuntimeError("a pending DMSCache layer is replaced before use")

    def get_seq_length(self) -> int:  # noqa: D102
        return 0

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:  # noqa: D102
        return cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:  # noqa: D102
        return -1

    def reorder_cache(self, beam_idx) -> None:  # noqa: D102
        return None

    def batch_select_indices(self, indices) -> None:  # noqa: D102
        return None

    def batch_repeat_interleave(self, repeats: int) -> None:  # noqa: D102
        return None

    def reset(self) -> None:  # noqa: D102
        return None


class DMSCache(Cache):
    """A transformers ``Cache`` that stores only the tokens DMS keeps, per layer, row and KV head.

    Args:
        layout: ``"blocked"`` (per-layer ``(B, H, C, D)`` storage grown by blocks to the longest row;
            one fused attention call per layer) or ``"paged"`` (a page pool per layer and a block
            table per (row, KV head): at most one page of waste per (row, head)).
        block_size: capacity step of the blocked layout, in tokens.
        page_size: page size of the paged layout, in tokens.
        prefill_chunk_size: process long inputs in query chunks of this many tokens (same result,
            smaller peak memory, faster: each chunk attends only to what is kept so far);
            ``None`` processes a call in one piece.

    """

    is_dms_cache = True
    is_compileable = False

    def __init__(
        self,
        layout: str = "blocked",
        block_size: int = 64,
        page_size: int = 64,
        prefill_chunk_size: int | None = 256,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        for name, value in (("block_size", block_size), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if prefill_chunk_size is not None and (
            not isinstance(prefill_chunk_size, int)
            or isinstance(prefill_chunk_size, bool)
            or prefill_chunk_size < 1
        ):
            raise ValueError(
                f"prefill_chunk_size must be an integer >= 1 or None, got {prefill_chunk_size!r}"
            )
        super().__init__(layers=[])
        self.layout = layout
        self.block_size = block_size
        self.page_size = page_size
        self.prefill_chunk_size = prefill_chunk_size
        self._real_memo: tuple | None = None  # (mask, (q_len, past, batch), real) of the last layer

    # ------------------------------------------------------------------ layers
    def _layer(self, layer_idx: int, dms_window: int | None) -> CacheLayerMixin:
        while len(self.layers) <= layer_idx:
            self.layers.append(_PendingLayer())
        if isinstance(self.layers[layer_idx], _PendingLayer):
            if dms_window is not None:
                layer = DMSCacheLayer(
                    dms_window, self.layout, self.block_size, self.page_size, self.prefill_chunk_size
                )
                self.layers[layer_idx] = DMSLayerAdapter(layer)
            else:
                self.layers[layer_idx] = DynamicLayer()
        return self.layers[layer_idx]

    def dms_layer(self, layer_idx: int) -> DMSCacheLayer:
        """The DMS layer at ``layer_idx`` (KeyError if that layer is not a DMS layer)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, DMSLayerAdapter):
            raise KeyError(f"layer {layer_idx} of this DMSCache is not a DMS layer")
        return layer.dms

    def dms_layers(self) -> dict[int, DMSCacheLayer]:
        """Every initialised DMS layer by layer index."""
        return {
            i: layer.dms
            for i, layer in enumerate(self.layers)
            if isinstance(layer, DMSLayerAdapter) and layer.dms.book is not None
        }

    # ------------------------------------------------------------------ transformers API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length (padding included) of ``layer_idx`` (or of the first layer if not yet there)."""
        if layer_idx < len(self.layers) and not isinstance(self.layers[layer_idx], _PendingLayer):
            return self.layers[layer_idx].get_seq_length()
        started = [layer for layer in self.layers if not isinstance(layer, _PendingLayer)]
        return started[0].get_seq_length() if started else 0

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:  # noqa: D102
        return self.get_seq_length(layer_idx) + cache_position.shape[0], 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # noqa: D102
        return -1

    @property
    def is_sliding(self) -> list[bool]:  # noqa: D102
        return [False] * len(self.layers)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """Dense storage for layers that DMS did not convert."""
        return self._layer(layer_idx, None).update(key_states, value_states, cache_kwargs)

    def crop(self, max_length: int) -> None:  # noqa: D102
        raise NotImplementedError("DMSCache cannot be cropped (evicted tokens are gone).")

    # ------------------------------------------------------------------ DMS attention
    def dms_attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        decisions: torch.Tensor,
        attention_mask: Any,
        scaling: float,
        window_size: int,
        kv_scales: tuple[float, float] | Callable[[], tuple[float, float] | None] | None = None,
    ) -> torch.Tensor:
        """Attend new tokens against the compact cache, then store them (with delayed eviction).

        Args:
            query: ``(B, Hq, T, D)`` after RoPE; key, value: ``(B, Hkv, T, D)``.
            decisions: ``(B, Hkv, T)`` bool, ``d_t`` emitted by each new token.
            attention_mask: the mask transformers built (4D, 2D padding mask, BlockMask) or None;
                only which new tokens are real is read from it.
            kv_scales: per-tensor FP8 scales of calibrated k/v quantizers (or a function returning
                them, called only on a layer's first call: reading them is a host sync); when given,
                keys and values are stored as ``float8_e4m3fn``.

        Returns:
            ``(B, T, Hq, D)``; padded query positions are zero.

        """
        layer = self._layer(layer_idx, window_size)
        if not isinstance(layer, DMSLayerAdapter):
            raise RuntimeError(f"layer {layer_idx} of this DMSCache already holds dense keys/values")
        bsz, _, q_len, _ = query.shape
        real = self._real_tokens(attention_mask, q_len, layer.dms.logical, bsz)  # None: all real
        if layer.dms.book is None and callable(kv_scales):
            kv_scales = kv_scales()
        decisions = as_dtype(decisions, torch.bool)
        out = layer.dms.attend(query, key, value, decisions, real, scaling, kv_scales)
        return out.transpose(1, 2)

    def _real_tokens(self, mask: Any, q_len: int, past: int, bsz: int) -> torch.Tensor | None:
        """Which new tokens are real, read off the mask once per forward (every layer gets the same mask)."""
        if mask is None:
            return None
        memo = self._real_memo
        if memo is not None and memo[0] is mask and memo[1] == (q_len, past, bsz):
            return memo[2]
        real = diagonal_validity(mask, q_len, past, bsz)
        self._real_memo = (mask, (q_len, past, bsz), real)
        return real

    # ------------------------------------------------------------------ memory and inspection
    def release(self, batch_index: int | None = None) -> None:
        """Free the storage of one finished sequence (``batch_index``) or of the whole cache."""
        if batch_index is None:
            self.layers.clear()
            return
        for layer in self.layers:
            if isinstance(layer, DMSLayerAdapter):
                layer.dms.release(batch_index)

    def row_state(self, layer_idx: int, batch: int, head: int) -> dict[str, Any]:
        """Stored positions, flags, keys and values of one (layer, row, head), for inspection and tests."""
        return self.dms_layer(layer_idx).row_state(batch, head)


def cache_stats(cache: DMSCache) -> dict[str, Any]:
    """Token and byte accounting of a :class:`DMSCache` (reads the device: not for a hot path).

    Returns a dict with ``tokens_seen`` and ``tokens_kept`` (``(layers, batch, kv_heads)`` int
    tensors, DMS layers only), ``compression_ratio`` (seen / kept, window included),
    ``kv_bytes_allocated`` (storage actually held), ``kv_bytes_kept`` (bytes the kept tokens need)
    and ``kv_bytes_dense`` (what a dense cache of the same tokens would hold in the model's compute
    dtype, so FP8 storage shows up as a further saving).
    """
    if not isinstance(cache, DMSCache):
        raise TypeError(f"cache_stats expects a DMSCache, got {type(cache).__name__}")
    seen, kept = [], []
    alloc = kept_bytes = dense = 0
    for _, layer in sorted(cache.dms_layers().items()):
        book, kv = layer.book, layer.kv
        heads = book.heads
        seen.append(book.seen[:, None].expand(-1, heads).cpu())
        kept.append(book.length.cpu())
        elem = torch.empty((), dtype=kv.codec.dtype).element_size()
        dense_elem = torch.empty((), dtype=layer.compute_dtype).element_size()
        alloc += kv.nbytes
        kept_bytes += 2 * int(book.length.sum()) * kv.head_dim * elem
        dense += 2 * layer.logical * book.batch * heads * kv.head_dim * dense_elem
    for layer in cache.layers:
        if isinstance(layer, DynamicLayer) and layer.keys is not None and layer.keys.numel():
            nbytes = (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            alloc += nbytes
            kept_bytes += nbytes
            dense += nbytes
    seen_t = torch.stack(seen).long() if seen else torch.zeros(0, dtype=torch.long)
    kept_t = torch.stack(kept).long() if kept else torch.zeros(0, dtype=torch.long)
    total_kept = int(kept_t.sum())
    return {
        "tokens_seen": seen_t,
        "tokens_kept": kept_t,
        "compression_ratio": float(seen_t.sum()) / total_kept if total_kept else float("nan"),
        "kv_bytes_allocated": int(alloc),
        "kv_bytes_kept": int(kept_bytes),
        "kv_bytes_dense": int(dense),
    }
