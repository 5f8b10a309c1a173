"""The previous, per-row DMS cache, kept as a test oracle for the batched :class:`modelopt_dms.DMSCache`.

It loops in Python over rows and heads (a reference, not a serving cache). Outputs, kept positions,
flags and lengths of the batched cache must equal it.

Compact DMS KV cache: per (layer, batch row, KV head) only the tokens DMS keeps.

Every row holds its own contiguous key/value storage that grows and shrinks in blocks of
``block_size`` tokens, so allocated bytes stay within one block per row of what the kept tokens
need. Slot order inside a row does not matter (keys are stored after RoPE).

Row invariant after ``n`` real tokens (positions ``0..n-1``, padding never enters): the ``W = w+1``
newest tokens are kept; an older token ``k`` is kept iff ``d_{k+1} = 0``. The flag of the newest
token is pending until the next token of that row arrives (also across turns).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from modelopt_dms.nn.masks import diagonal_validity

__all__ = ["PerRowDMSCache", "oracle_cache_stats"]


@dataclass
class _Row:
    """Storage of one (layer, batch row, KV head)."""

    k: torch.Tensor  # (capacity, D)
    v: torch.Tensor
    pos: torch.Tensor  # (capacity,) int64 positions of the stored tokens
    flag: torch.Tensor  # (capacity,) bool: evict once out of the window
    k_scale: float | None = None  # FP8 storage: stored = value / scale as float8_e4m3fn
    v_scale: float | None = None
    n: int = 0  # used slots
    seen: int = 0  # real tokens seen
    window: deque = field(default_factory=deque)  # slots of the newest tokens, oldest first

    @property
    def capacity(self) -> int:
        return self.k.shape[0]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values -> storage dtype (divide by the FP8 scale when quantized)."""
        if self.k_scale is None:
            return k.to(self.k.dtype), v.to(self.v.dtype)
        return (k.float() / self.k_scale).to(self.k.dtype), (v.float() / self.v_scale).to(self.v.dtype)

    def decode(
        self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage -> compute dtype (multiply by the FP8 scale when quantized)."""
        if self.k_scale is None:
            return k.to(dtype), v.to(dtype)
        return k.to(dtype) * self.k_scale, v.to(dtype) * self.v_scale


def _alloc(cap: int, head_dim: int, like: torch.Tensor, store_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    dev = like.device
    return (
        torch.empty(cap, head_dim, dtype=store_dtype, device=dev),
        torch.empty(cap, head_dim, dtype=store_dtype, device=dev),
        torch.empty(cap, dtype=torch.long, device=dev),
        torch.zeros(cap, dtype=torch.bool, device=dev),
    )


class PerRowDMSCache(Cache):
    """A transformers ``Cache`` that stores only the tokens DMS keeps, per layer, row and KV head.

    Args:
        block_size: storage granularity in tokens (rows grow and shrink by whole blocks).
        prefill_chunk_size: process long inputs in query chunks of this many tokens (same result,
            smaller peak memory, and faster: each chunk attends only to what is kept so far;
            256 measured best on CPU, see benchmarks/); ``None`` processes a call in one piece.

    """

    is_dms_cache = True
    is_compileable = False

    def __init__(self, block_size: int = 64, prefill_chunk_size: int | None = 256) -> None:
        super().__init__(layers=[])
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 or None, got {prefill_chunk_size}")
        self.block_size = block_size
        self.prefill_chunk_size = prefill_chunk_size
        self._rows: dict[int, list[list[_Row]]] = {}  # layer -> [batch][kv_head]
        self._logical: dict[int, int] = {}  # layer -> tokens passed in (padding included)
        self._dense: dict[int, DynamicLayer] = {}  # layers without DMS
        self._dtype: dict[int, torch.dtype] = {}

    # ------------------------------------------------------------------ transformers API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length: tokens passed in so far (padding included), like a dense cache."""
        if layer_idx in self._dense:
            return self._dense[layer_idx].get_seq_length()
        return self._logical.get(layer_idx, next(iter(self._logical.values()), 0))

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        """Masks cover the logical sequence; DMS layers only read the padding of new tokens."""
        return self.get_seq_length(layer_idx) + cache_position.shape[0], 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """No maximum: rows grow as needed."""
        return -1

    @property
    def is_sliding(self) -> list[bool]:  # noqa: D102
        return []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """Dense storage for layers that DMS did not convert."""
        layer = self._dense.setdefault(layer_idx, DynamicLayer())
        return layer.update(key_states, value_states, cache_kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # noqa: D102
        raise NotImplementedError("DMSCache does not support beam search; use greedy or sampling.")

    def crop(self, max_length: int) -> None:  # noqa: D102
        raise NotImplementedError("DMSCache cannot be cropped (evicted tokens are gone).")

    def batch_repeat_interleave(self, repeats: int) -> None:  # noqa: D102
        raise NotImplementedError("DMSCache does not support num_return_sequences > 1 or beams.")

    # ------------------------------------------------------------------ DMS attention
    def dms_attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        decisions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        window_size: int,
        kv_scales: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Attend new tokens against the compact cache, then store them (with delayed eviction).

        Args:
            query: ``(B, Hq, T, D)`` after RoPE; key, value: ``(B, Hkv, T, D)``.
            decisions: ``(B, Hkv, T)`` bool, ``d_t`` emitted by each new token.
            attention_mask: the mask transformers built (4D over the logical sequence) or None.
            kv_scales: per-tensor FP8 scales of calibrated k/v quantizers; when given, keys and
                values are stored as ``float8_e4m3fn`` (set once, on the first call of a layer).

        Returns:
            ``(B, T, Hq, D)``; padded query positions are zero.

        """
        bsz, num_q, q_len, head_dim = query.shape
        num_kv = key.shape[1]
        real = diagonal_validity(attention_mask, q_len, self._logical.get(layer_idx, 0), bsz)
        if real is None:
            real = torch.ones(bsz, q_len, dtype=torch.bool, device=query.device)
        rows = self._rows.get(layer_idx)
        if rows is None:
            rows = self._init_layer(layer_idx, bsz, num_kv, head_dim, key, kv_scales)
        elif len(rows) != bsz or len(rows[0]) != num_kv:
            raise ValueError(
                f"DMSCache layer {layer_idx} holds batch {len(rows)} x {len(rows[0])} KV heads, got "
                f"{bsz} x {num_kv}: use a new cache for a new batch."
            )
        self._logical[layer_idx] = self._logical.get(layer_idx, 0) + q_len
        out = query.new_zeros(bsz, q_len, num_q, head_dim)
        group = num_q // num_kv
        chunk = self.prefill_chunk_size or q_len
        all_real = bool(real.all())
        for b in range(bsz):
            idx = None if all_real else real[b].nonzero().flatten()
            count = q_len if idx is None else idx.numel()
            for start in range(0, count, chunk):
                # slices (views) when nothing is padded, index tensors otherwise
                sel = slice(start, min(start + chunk, count)) if idx is None else idx[start : start + chunk]
                for h in range(num_kv):
                    heads = slice(h * group, (h + 1) * group)
                    res = self._attend_row(
                        rows[b][h],
                        query[b, heads][:, sel],
                        key[b, h, sel],
                        value[b, h, sel],
                        decisions[b, h, sel],
                        scaling,
                        window_size,
                    )
                    out[b, sel, heads] = res.transpose(0, 1).to(out.dtype)
        return out

    def _init_layer(self, layer_idx, bsz, num_kv, head_dim, like, kv_scales) -> list[list[_Row]]:
        store = like.dtype if kv_scales is None else torch.float8_e4m3fn
        ks, vs = kv_scales if kv_scales is not None else (None, None)
        rows = [
            [_Row(*_alloc(0, head_dim, like, store), k_scale=ks, v_scale=vs) for _ in range(num_kv)]
            for _ in range(bsz)
        ]
        self._rows[layer_idx] = rows
        self._dtype[layer_idx] = like.dtype  # compute dtype: what a dense cache would store
        return rows

    def _resize(self, row: _Row, needed: int) -> None:
        """Grow or shrink ``row`` storage to the smallest whole number of blocks >= needed."""
        bs = self.block_size
        cap = -(-needed // bs) * bs
        if cap == row.capacity:
            return
        k, v, pos, flag = _alloc(cap, row.k.shape[1], row.k, row.k.dtype)
        n = row.n
        k[:n], v[:n], pos[:n], flag[:n] = row.k[:n], row.v[:n], row.pos[:n], row.flag[:n]
        row.k, row.v, row.pos, row.flag = k, v, pos, flag

    def _attend_row(self, row, q, k_new, v_new, d_new, scaling, window_size) -> torch.Tensor:
        """One row, ``m`` new real tokens. q: (G, m, D). Returns (G, m, D)."""
        m = k_new.shape[0]
        if m == 0:
            return q.new_zeros(q.shape)
        big_w = window_size + 1
        t0 = row.seen
        if row.window:  # the first new decision settles the pending flag of the previous token
            row.flag[row.window[-1]] = d_new[0]
        if m == 1:
            return self._decode_row(row, q, k_new, v_new, scaling, big_w)
        new_pos = torch.arange(t0, t0 + m, device=k_new.device)
        new_flag = torch.cat([d_new[1:], d_new.new_zeros(1)])
        n = row.n
        k_enc, v_enc = row.encode(k_new, v_new)
        keys = torch.cat([row.k[:n], k_enc]) if n else k_enc
        vals = torch.cat([row.v[:n], v_enc]) if n else v_enc
        pos = torch.cat([row.pos[:n], new_pos])
        flag = torch.cat([row.flag[:n], new_flag])
        causal = pos[None, :] <= new_pos[:, None]
        far = pos[None, :] < new_pos[:, None] - window_size  # q - k > w
        visible = causal & ~(far & flag[None, :])
        out = _masked_row_attention(q, *row.decode(keys, vals, _acc_dtype(q.dtype)), visible, scaling)
        # keep: window tokens (newest W) and unflagged older tokens
        last = t0 + m - 1
        keep = (pos > last - big_w) | ~flag
        kept = keep.nonzero().flatten()
        row.seen = t0 + m
        row.n = 0
        self._resize(row, kept.numel())
        cnt = kept.numel()
        row.k[:cnt], row.v[:cnt], row.pos[:cnt], row.flag[:cnt] = (
            keys[kept],
            vals[kept],
            pos[kept],
            flag[kept],
        )
        row.n = cnt
        kept_pos = row.pos[:cnt]
        win_slots = (kept_pos > last - big_w).nonzero().flatten()
        order = kept_pos[win_slots].argsort()
        row.window = deque(win_slots[order].tolist())
        return out

    def _decode_row(self, row, q, k_new, v_new, scaling, big_w) -> torch.Tensor:
        t = row.seen
        slot = None
        if len(row.window) == big_w:
            leaving = row.window.popleft()
            if bool(row.flag[leaving]):
                slot = leaving  # delayed eviction: reuse the slot in place
        if slot is None:
            if row.n == row.capacity:
                self._resize(row, row.n + 1)
            slot = row.n
            row.n += 1
        row.k[slot], row.v[slot] = row.encode(k_new[0], v_new[0])
        row.pos[slot] = t
        row.flag[slot] = False
        row.window.append(slot)
        row.seen = t + 1
        n = row.n
        acc = _acc_dtype(q.dtype)
        keys, vals = row.decode(row.k[:n], row.v[:n], acc)
        scores = torch.matmul(q[:, 0].to(acc), keys.T) * scaling  # (G, n)
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, vals).unsqueeze(1)

    # ------------------------------------------------------------------ memory and statistics
    def release(self, batch_index: int | None = None) -> None:
        """Free the storage of one finished sequence (``batch_index``) or of the whole cache."""
        for _layer_idx, rows in self._rows.items():
            for b, heads in enumerate(rows):
                if batch_index is not None and b != batch_index:
                    continue
                for h, row in enumerate(heads):
                    empty = _Row(*_alloc(0, row.k.shape[1], row.k, row.k.dtype), row.k_scale, row.v_scale)
                    rows[b][h] = empty
        if batch_index is None:
            self._rows.clear()
            self._logical.clear()
            self._dense.clear()

    def row_state(self, layer_idx: int, batch: int, head: int) -> dict[str, torch.Tensor]:
        """Stored positions, flags, keys and values of one row (for inspection and tests)."""
        row = self._rows[layer_idx][batch][head]
        n = row.n
        return {
            "pos": row.pos[:n].clone(),
            "flag": row.flag[:n].clone(),
            "k": row.k[:n],
            "v": row.v[:n],
            "seen": row.seen,
            "capacity": row.capacity,
        }


def _masked_row_attention(q, keys, vals, visible, scaling) -> torch.Tensor:
    """q: (G, m, D); keys/vals: (L, D) in the accumulation dtype; visible: (m, L) bool.

    Fused SDPA with a boolean mask (every real query sees at least itself).
    """
    acc = keys.dtype
    group, _, dim = q.shape
    out = F.scaled_dot_product_attention(
        q.to(acc)[None],
        keys[None, None].expand(1, group, -1, dim),
        vals[None, None].expand(1, group, -1, dim),
        attn_mask=visible,
        scale=scaling,
    )
    return out[0]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def oracle_cache_stats(cache: PerRowDMSCache) -> dict[str, Any]:
    """Token and byte accounting of a :class:`DMSCache`.

    Returns a dict with ``tokens_seen`` and ``tokens_kept`` (``(layers, batch, kv_heads)`` int
    tensors, DMS layers only), ``compression_ratio`` (seen / kept, window included),
    ``kv_bytes_allocated`` (storage actually held), ``kv_bytes_kept`` (bytes the kept tokens
    need) and ``kv_bytes_dense`` (what a dense cache of the same tokens would hold in the
    model's compute dtype, so FP8 storage shows up as a further saving).
    """
    layers = sorted(cache._rows)
    seen, kept = [], []
    alloc = kept_bytes = dense = 0
    for li in layers:
        rows = cache._rows[li]
        dense_elem = torch.empty(0, dtype=cache._dtype[li]).element_size()
        seen.append([[r.seen for r in heads] for heads in rows])
        kept.append([[r.n for r in heads] for heads in rows])
        for heads in rows:
            for r in heads:
                elem = r.k.element_size()
                alloc += (r.k.numel() + r.v.numel()) * elem
                kept_bytes += 2 * r.n * r.k.shape[1] * elem
                dense += 2 * cache._logical[li] * r.k.shape[1] * dense_elem
    for layer in cache._dense.values():
        if layer.keys is not None and layer.keys.numel():
            nbytes = (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            alloc += nbytes
            kept_bytes += nbytes
            dense += nbytes
    seen_t = torch.tensor(seen, dtype=torch.long) if seen else torch.zeros(0, dtype=torch.long)
    kept_t = torch.tensor(kept, dtype=torch.long) if kept else torch.zeros(0, dtype=torch.long)
    total_kept = int(kept_t.sum())
    return {
        "tokens_seen": seen_t,
        "tokens_kept": kept_t,
        "compression_ratio": float(seen_t.sum()) / total_kept if total_kept else float("nan"),
        "kv_bytes_allocated": int(alloc),
        "kv_bytes_kept": int(kept_bytes),
        "kv_bytes_dense": int(dense),
    }
