"""One layer of the DMS cache: slot bookkeeping (:class:`RowBook`) + KV storage + attention.

A call of ``m`` new tokens (per batch row, left padding or padding anywhere allowed):

* ``m == 1`` (decode): the token is stored first (reusing the slot of the flagged token leaving the
  window, else appended), then attends over the stored slots. No host read, no Python loop over
  rows or heads; the host only keeps an upper bound of the longest row to size the storage.
* ``m > 1`` (prefill, in chunks of ``prefill_chunk_size``): each chunk attends over the stored
  slots plus itself under the hard DMS mask, then is stored: only the past window and the chunk
  can change state, so bookkeeping is O(w + chunk) per row (see :meth:`RowBook.plan_chunk`).
"""

from __future__ import annotations

import torch

from .book import RowBook
from .kernels import blockwise_parts, decode_attention, sdpa_parts
from .storage import BlockedKV, KVCodec, PagedKV

__all__ = ["DMSCacheLayer"]

FP8_READ_BLOCK = 1024  # slots dequantised at a time when the storage is FP8


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask in SDPA's additive form: 0 where visible, -inf elsewhere."""
    out = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return out.masked_fill_(~visible, float("-inf"))


class DMSCacheLayer:
    """The state of one DMS attention layer in a :class:`~modelopt_dms.cache.DMSCache`."""

    is_dms_layer = True

    def __init__(
        self,
        window: int,
        layout: str = "blocked",
        block_size: int = 64,
        page_size: int = 64,
        prefill_chunk_size: int | None = 256,
    ) -> None:
        self.window = window
        self.layout = layout
        self.block_size = block_size
        self.page_size = page_size
        self.prefill_chunk_size = prefill_chunk_size
        self.book: RowBook | None = None
        self.kv: BlockedKV | PagedKV | None = None
        self.logical = 0  # tokens passed in, padding included (what a dense cache would hold)
        self.compute_dtype: torch.dtype | None = None
        self._visible: torch.Tensor | None = None  # decode visibility of the book at _visible_version
        self._visible_version = -1  # no book version: rebuild at the next decode step

    # ------------------------------------------------------------------ set-up and capacity
    def _init(self, key: torch.Tensor, kv_scales: tuple[float, float] | None) -> None:
        bsz, heads, _, dim = key.shape
        self.compute_dtype = key.dtype
        self._visible = None
        self._visible_version = -1  # no book version: rebuild at the next decode step
        codec = KVCodec(key.dtype, kv_scales)
        self.book = RowBook(bsz, heads, self.window, key.device)
        if self.layout == "paged":
            self.kv = PagedKV(bsz, heads, dim, codec, key.device, self.page_size)
        else:
            self.kv = BlockedKV(bsz, heads, dim, codec, key.device)

    def init_storage(self, key_like: torch.Tensor, kv_scales: tuple[float, float] | None = None) -> None:
        """Set the layer up for ``key_like``'s batch, heads, head dim, dtype and device.

        Leaves room for one token per row (for drivers that bind the storage before the first token).
        """
        self._init(key_like, kv_scales)
        self._ensure(1)

    @property
    def granule(self) -> int:
        """Capacity step: a block (blocked layout) or a page (paged layout)."""
        return self.page_size if self.layout == "paged" else self.block_size

    def _set_capacity(self, slots: int, lengths: torch.Tensor | None) -> None:
        cap = -(-slots // self.granule) * self.granule
        self.book.resize(cap)
        self.kv.resize(cap, lengths)

    def _ensure(self, slots: int, lengths: torch.Tensor | None = None) -> None:
        """At least ``slots`` logical slots per row (rows hold storage for ``lengths``)."""
        if slots > self.book.capacity:
            self._set_capacity(slots, lengths)
        elif lengths is not None:
            self.kv.resize(self.book.capacity, lengths)

    def _ensure_growing(self, slots: int, lengths: torch.Tensor | None = None) -> None:
        """:meth:`_ensure` within a multi-token call: grow by half at least (few reallocations).

        The call ends with :meth:`_fit`, which gives the extra room back.
        """
        cap = self.book.capacity
        self._ensure(max(slots, cap + cap // 2) if slots > cap else slots, lengths)

    def _fit(self) -> None:
        """After a prefill: shrink to the longest row (+ the scratch slot) in whole blocks/pages.

        The paged pool then keeps only the pages rows hold (its growth by halves is given back).
        """
        needed = self.book.max_length_bound + 1
        target = -(-needed // self.granule) * self.granule
        if target < self.book.capacity or self.layout == "paged":
            self._set_capacity(needed, self.book.length)
        if self.layout == "paged":
            self.kv.trim()

    # ------------------------------------------------------------------ attention
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        decisions: torch.Tensor,
        real: torch.Tensor,
        scaling: float,
        kv_scales: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """New tokens attend and are stored.

        Shapes: query ``(B, Hq, m, D)``, key/value ``(B, H, m, D)`` after RoPE, decisions
        ``(B, H, m)`` bool, real ``(B, m)`` bool.

        Returns ``(B, Hq, m, D)``; padded query positions are zero.
        """
        if self.book is None:
            self._init(key, None if callable(kv_scales) else kv_scales)
        elif key.shape[0] != self.book.batch or key.shape[1] != self.book.heads:
            raise ValueError(
                f"this DMSCache layer holds batch {self.book.batch} x {self.book.heads} KV heads, got "
                f"{key.shape[0]} x {key.shape[1]}: use a new cache for a new batch."
            )
        m = query.shape[2]
        self.logical += m
        if m == 1:
            return self._decode(
                query, key, value, decisions[..., 0], None if real is None else real[:, 0], scaling
            )
        chunk = self.prefill_chunk_size or m
        outs = []
        for start in range(0, m, chunk):
            sl = slice(start, min(m, start + chunk))
            q, k, v = query[:, :, sl], key[:, :, sl], value[:, :, sl]
            r = None if real is None else real[:, sl]
            outs.append(self._chunk(q, k, v, decisions[..., sl], r, scaling))
        self._fit()
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _decode(self, query, key, value, decision, real, scaling) -> torch.Tensor:
        kv = self.kv
        self._ensure_decode()
        in_step = self._visible_version == self.book.version
        plan = self.book.plan_decode(decision, real)
        slot = plan.slot[..., None]  # (B, H, 1)
        kv.write(slot, key, value)
        mask = self._decode_visibility(slot, real, in_step)
        if kv.codec.fp8:
            out = self._attend_stored(query, mask, [], scaling)
        else:
            keys, values = kv.read(0, self.book.capacity, query.dtype)
            out = decode_attention(query, keys, values, mask, scaling)
        return out if real is None else out * real[:, None, None, None].to(out.dtype)

    def _decode_visibility(
        self, slot: torch.Tensor, real: torch.Tensor | None, in_step: bool
    ) -> torch.Tensor:
        """``(B, H, 1, C)`` slots the new token sees, kept across decode steps.

        Additive (0 / -inf in the compute dtype) for the SDPA path, boolean for FP8 storage.

        Every stored slot is visible to the new token (flagged ones left when their slot was
        reused); slot 0 keeps the mask of a row without tokens non-empty (its output is zeroed). A
        decode step only adds the slot it wrote (rows without a real token add nothing), so the
        mask is updated in place when it matched the book just before this step (``in_step``) and
        rebuilt after any other edit of the book (a prefill chunk, a batch edit, a capacity change,
        a store without attention): :attr:`RowBook.version` says which.
        """
        book = self.book
        additive = not self.kv.codec.fp8  # SDPA's own form of a boolean mask: no conversion per step
        if not in_step:
            slots = self._slot_ids()
            seen = ((slots < book.length[..., None]) | (slots == 0))[:, :, None, :]
            self._visible = _additive(seen, self.compute_dtype) if additive else seen.contiguous()
        elif real is None:
            self._visible.scatter_(-1, slot[..., None], 0.0 if additive else True)
        else:  # a row without a real token wrote its first free slot, which stays hidden
            value = real[:, None, None, None].expand(-1, book.heads, 1, 1)
            if additive:
                value = _additive(value, self.compute_dtype)
            self._visible.scatter_(-1, slot[..., None], value)
        self._visible_version = book.version
        return self._visible

    def _slot_ids(self) -> torch.Tensor:
        """``arange(capacity)`` on the layer's device, kept until the capacity changes."""
        cap = self.book.capacity
        if getattr(self, "_slots", None) is None or self._slots.shape[0] != cap:
            self._slots = torch.arange(cap, device=self.book.length.device)
        return self._slots

    def _chunk(self, query, key, value, decisions, real, scaling) -> torch.Tensor:
        """One prefill chunk; ``real`` ``(B, m)`` or None (no padding: every query sees itself)."""
        book, w = self.book, self.window
        m = query.shape[2]
        first_decision, new_flag = book.chunk_flags(decisions, real)
        book.settle_pending(first_decision, None if real is None else real.any(-1))
        q_pos = book.new_positions(real, m)  # (B, m)
        # a key is visible to the queries at positions pos .. last: last = pos + w if it is flagged,
        # else forever; slots without a token (and padded keys) have last = -1
        forever = torch.iinfo(torch.long).max
        q_col = q_pos[:, None, :, None]  # (B, 1, m, 1)
        cap = min(book.max_length_bound, book.capacity)  # slots beyond the longest row are unused
        if cap:
            last = torch.where(book.flag[..., :cap], book.pos[..., :cap] + w, forever)
            last = torch.where(self._slot_ids()[:cap] < book.length[..., None], last, -1)  # (B, H, C)
            past_mask = q_col <= last[:, :, None, :]  # (B, H, m, C); stored keys are all older
        else:
            past_mask = torch.zeros(*book.length.shape, m, 0, dtype=torch.bool, device=key.device)
        new_last = torch.where(new_flag, q_pos[:, None, :] + w, forever)  # (B, H, m)
        if real is not None:
            new_last = torch.where(real[:, None, :], new_last, -1)
        causal = (q_pos[:, :, None] >= q_pos[:, None, :])[:, None]  # (B, 1, m, m)
        new_mask = causal & (q_col <= new_last[:, :, None, :])
        if real is not None:  # padded queries see nothing (their output is zero)
            past_mask = past_mask & real[:, None, :, None]
            new_mask = new_mask & real[:, None, :, None]
        out = self._attend_stored(query, past_mask, [(key, value, new_mask)], scaling, non_empty=real is None)
        self._store_chunk(key, value, decisions, real, new_flag)
        return out

    def _store_chunk(self, key, value, decisions, real, new_flag=None) -> None:
        plan = self.book.plan_chunk(decisions, real, self._ensure_growing, new_flag)
        self.kv.write(plan.dest, key, value)

    def store(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        decisions: torch.Tensor,
        real: torch.Tensor | None,
        kv_scales: tuple[float, float] | None = None,
    ) -> None:
        """Store new tokens whose attention ran elsewhere (an exported step graph).

        The same bookkeeping as :meth:`attend`, without the attention.
        """
        if self.book is None:
            self._init(key, kv_scales)
        m = key.shape[2]
        self.logical += m
        if m == 1:
            self._ensure_decode()
            plan = self.book.plan_decode(decisions[..., 0], None if real is None else real[:, 0])
            self.kv.write(plan.slot[..., None], key, value)
            return
        self._store_chunk(key, value, decisions, real)
        self._fit()

    def _ensure_decode(self) -> None:
        """Before a decode step: room for one more slot per row (a host read only when it may grow)."""
        book = self.book
        if book.max_length_bound + 1 > book.capacity:
            book.refresh_bound()
            self._ensure(book.max_length_bound + 1)
        self.kv.prepare_decode(book.length)

    def _attend_stored(self, query, stored_mask, extra, scaling, non_empty: bool = False) -> torch.Tensor:
        """Attention over the stored slots (with ``stored_mask``) plus ``extra`` parts.

        ``non_empty``: every query row sees some key (no padded query), so no guard is needed.
        """
        cap = stored_mask.shape[-1]
        dtype = query.dtype
        if not self.kv.codec.fp8:
            keys, values = self.kv.read(0, cap, dtype) if cap else (None, None)
            parts = ([(keys, values, stored_mask)] if cap else []) + extra
            if not parts:
                return query.new_zeros(query.shape)
            return sdpa_parts(query, parts, scaling, non_empty=non_empty)

        def reader(start: int, end: int):
            def read():
                k, v = self.kv.read(start, end, dtype)
                return k, v, stored_mask[..., start:end]

            return read

        readers = [reader(s, min(cap, s + FP8_READ_BLOCK)) for s in range(0, cap, FP8_READ_BLOCK)]
        return blockwise_parts(query, [*readers, *extra], scaling, self.book.heads)

    # ------------------------------------------------------------------ batch edits and accounting
    def select_rows(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beam search, ``num_return_sequences``)."""
        if self.book is not None:
            self.book.select_rows(index)
            self.kv.select_rows(index)
            self.book.refresh_bound()
            self._fit()

    def release(self, b: int) -> None:
        """Free batch row ``b`` (a finished sequence)."""
        if self.book is None:
            return
        self.book.clear_row(b)
        self.kv.clear_row(b)
        self.book.refresh_bound()
        self._fit()

    def row_state(self, b: int, h: int) -> dict:
        """Stored positions, flags, keys and values (storage dtype) of one (row, head), for tests."""
        book = self.book
        n = int(book.length[b, h])
        keys, values = self.kv.raw(0, book.capacity)  # as stored (FP8 stays FP8)
        return {
            "pos": book.pos[b, h, :n].clone(),
            "flag": book.flag[b, h, :n].clone(),
            "k": keys[b, h, :n],
            "v": values[b, h, :n],
            "seen": int(book.seen[b]),
            "capacity": book.capacity,
        }
