"""Key/value storage of one DMS cache layer, addressed by logical slot per (batch row, KV head).

Two layouts behind one interface:

* :class:`BlockedKV`: ``(B, H, C, D)`` tensors; ``C`` grows (and shrinks) by whole blocks to the
  longest row of the layer. One attention call reads it directly (the CPU path).
* :class:`PagedKV`: one page pool ``(N, P, D)`` per layer and a block table ``(B, H, pages)``, so
  ragged per-head lengths waste at most one page per (row, head). Pages are allocated and
  returned on the device (a free-page stack), without host reads in a decode step.

FP8 storage (calibrated per-tensor scales): values are divided by the scale, clamped explicitly to
the E4M3 range (±448) and stored as ``float8_e4m3fn``; reads dequantise one block of slots at a time.
"""

from __future__ import annotations

import torch

from ..nn.dtypes import as_dtype

__all__ = ["FP8_E4M3_MAX", "BlockedKV", "KVCodec", "PagedKV"]

FP8_E4M3_MAX = 448.0


class KVCodec:
    """Storage dtype and (for FP8) the per-tensor scales of keys and values."""

    def __init__(self, compute_dtype: torch.dtype, scales: tuple[float, float] | None) -> None:
        self.compute_dtype = compute_dtype
        self.scales = scales
        self.dtype = torch.float8_e4m3fn if scales is not None else compute_dtype

    @property
    def fp8(self) -> bool:  # noqa: D102
        return self.scales is not None

    def encode(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """Compute dtype -> storage dtype (FP8: scale, clamp to ±448, cast)."""
        if self.scales is None:
            return as_dtype(x, self.dtype)
        scaled = x.float() / self.scales[which]
        return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(self.dtype)

    def decode(self, x: torch.Tensor, which: int, dtype: torch.dtype) -> torch.Tensor:
        """Storage dtype -> ``dtype`` (FP8: cast and multiply by the scale)."""
        if self.scales is None:
            return as_dtype(x, dtype)
        return x.to(dtype) * self.scales[which]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as uint8 (same bytes): scatter/gather/index_copy have no FP8 kernels on every device."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _slot_index(slot: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, H, n) -> (B, H, n, D) index for gather/scatter along the slot axis."""
    return slot[..., None].expand(*slot.shape, dim)


class BlockedKV:
    """Padded per-layer storage ``(B, H, C, D)``; see the module docstring."""

    layout = "blocked"

    def __init__(self, batch: int, heads: int, head_dim: int, codec: KVCodec, device: torch.device) -> None:
        self.codec = codec
        self.head_dim = head_dim
        shape = (batch, heads, 0, head_dim)
        self.k = torch.zeros(shape, dtype=codec.dtype, device=device)
        self.v = torch.zeros(shape, dtype=codec.dtype, device=device)

    @property
    def capacity(self) -> int:  # noqa: D102
        return self.k.shape[2]

    def resize(self, capacity: int, lengths: torch.Tensor | None = None) -> None:
        """Grow or shrink to ``capacity`` slots per row, keeping the used ones."""
        if capacity == self.capacity:
            return
        keep = min(capacity, self.capacity)
        b, h, _, d = self.k.shape
        k = self.k.new_zeros(b, h, capacity, d)
        v = self.v.new_zeros(b, h, capacity, d)
        k[:, :, :keep] = self.k[:, :, :keep]
        v[:, :, :keep] = self.v[:, :, :keep]
        self.k, self.v = k, v

    def prepare_decode(self, lengths: torch.Tensor) -> None:
        """Nothing to allocate per row: the capacity covers every row."""

    def write(self, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """``slot``: (B, H, n) logical slots; ``key``/``value``: (B, H, n, D) compute dtype."""
        idx = _slot_index(slot, self.head_dim)
        _bits(self.k).scatter_(2, idx, _bits(self.codec.encode(key, 0)))
        _bits(self.v).scatter_(2, idx, _bits(self.codec.encode(value, 1)))

    def raw(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys and values of slots ``[start, end)``, ``(B, H, n, D)`` in the storage dtype."""
        if start == 0 and end == self.capacity:
            return self.k, self.v
        return self.k[:, :, start:end], self.v[:, :, start:end]

    def read(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[start, end)`` of every row, ``(B, H, n, D)`` in ``dtype``."""
        k, v = self.raw(start, end)
        return self.codec.decode(k, 0, dtype), self.codec.decode(v, 1, dtype)

    def select_rows(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beams, ``num_return_sequences``)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def clear_row(self, b: int) -> None:
        """Row ``b`` holds nothing any more (its slots are reused by the capacity policy)."""
        self.k[b] = 0
        self.v[b] = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage tensors."""
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def row_bytes(self, b: int) -> int:
        """Bytes attributable to batch row ``b`` (all its heads)."""
        return self.nbytes // max(1, self.k.shape[0])


class PagedKV:
    """A page pool per layer plus a block table per (row, KV head); see the module docstring.

    Pool page 0 is a trash page that is never handed out: writes to slots a row holds no page for
    (the scratch slot, rows without a token) land there. Free pages are a stack on the device
    (``free[:free_top]``); the host keeps a lower bound of ``free_top`` and reads it back only when
    the bound says the pool might run out.
    """

    layout = "paged"

    def __init__(
        self, batch: int, heads: int, head_dim: int, codec: KVCodec, device: torch.device, page_size: int
    ) -> None:
        self.codec = codec
        self.head_dim = head_dim
        self.page_size = page_size
        self.batch, self.heads = batch, heads
        self.pool_k = torch.zeros(1, page_size, head_dim, dtype=codec.dtype, device=device)
        self.pool_v = torch.zeros_like(self.pool_k)
        self.table = torch.zeros(batch, heads, 1, dtype=torch.long, device=device)  # page ids, 0 = none
        self.npages = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.free = torch.zeros(1, dtype=torch.long, device=device)  # stack; the last cell is a trash cell
        self.free_top = torch.zeros((), dtype=torch.long, device=device)
        self.free_bound = 0  # host lower bound of free_top (exact after a resize)
        self.decode_steps_left = 0  # decode steps the pool surely covers without reading free_top
        self.capacity = 0  # logical slots per row

    # ------------------------------------------------------------------ pool
    @property
    def pool_pages(self) -> int:
        """Pages in the pool, the trash page not counted."""
        return self.pool_k.shape[0] - 1

    def _grow_pool(self, extra: int) -> None:
        old = self.pool_k.shape[0]
        shape = (old + extra, self.page_size, self.head_dim)
        pool_k, pool_v = self.pool_k.new_zeros(shape), self.pool_v.new_zeros(shape)
        pool_k[:old], pool_v[:old] = self.pool_k, self.pool_v
        self.pool_k, self.pool_v = pool_k, pool_v
        top = int(self.free_top)
        free = torch.zeros(old + extra, dtype=torch.long, device=self.free.device)
        free[:top] = self.free[:top]
        free[top : top + extra] = torch.arange(old, old + extra, device=free.device)
        self.free = free
        self.free_top = torch.tensor(top + extra, device=free.device)
        self.free_bound = top + extra

    def trim(self) -> None:
        """Give the free pages back: live pages move to the front of a pool of just their size.

        Called after a multi-token call (prefill, a new turn, a batch edit), whose growth by halves
        would otherwise stay allocated. One host read (the live page count) and one gather of the
        live pages; never in a decode step.
        """
        cols = torch.arange(self.table.shape[-1], device=self.table.device)
        live = cols < self.npages[..., None]  # (B, H, T)
        old_ids = self.table[live]  # row-major order of (row, head, page column)
        n = int(old_ids.numel())
        if n == self.pool_pages:
            return
        keep = torch.cat([old_ids.new_zeros(1), old_ids])  # the trash page stays page 0
        self.pool_k = _bits(self.pool_k).index_select(0, keep).view(self.pool_k.dtype)
        self.pool_v = _bits(self.pool_v).index_select(0, keep).view(self.pool_v.dtype)
        table = torch.zeros_like(self.table)
        table[live] = torch.arange(1, n + 1, device=table.device)
        self.table = table
        self.free = torch.zeros(n + 1, dtype=torch.long, device=self.free.device)
        self.free_top = torch.zeros((), dtype=torch.long, device=self.free.device)
        self.free_bound = 0
        self.decode_steps_left = 0

    def _reserve(self, pages: int) -> None:
        """At least ``pages`` free pages (a host read only if the lower bound is too low)."""
        if self.free_bound >= pages:
            return
        self.free_bound = int(self.free_top)
        if self.free_bound < pages:
            self._grow_pool(max(pages - self.free_bound, self.pool_pages // 2, 1))

    def _widen_table(self, pages: int) -> None:
        if pages > self.table.shape[-1]:
            extra = self.table.new_zeros(self.batch, self.heads, pages - self.table.shape[-1])
            self.table = torch.cat([self.table, extra], dim=-1)

    def _allocate(self, need: torch.Tensor, max_per_row: int) -> None:
        """Give row ``(b, h)`` ``need[b, h] <= max_per_row`` more pages (pops of the free stack)."""
        if max_per_row <= 0:
            return
        self._reserve(self.batch * self.heads * max_per_row)
        self._pop(need, max_per_row)

    def _pop(self, need: torch.Tensor, max_per_row: int) -> None:
        """The device side of :meth:`_allocate`; the caller guarantees enough free pages."""
        self._widen_table(int(self.table.shape[-1]) + max_per_row)
        flat_need = need.flatten()
        start = (flat_need.cumsum(0) - flat_need).view_as(need)  # pops before this row
        j = torch.arange(max_per_row, device=need.device)
        take = j < need[..., None]  # (B, H, J)
        stack_pos = (self.free_top - 1 - (start[..., None] + j)).clamp_min(0)
        pages = self.free[stack_pos]
        last = self.table.shape[-1] - 1
        col = torch.where(take, self.npages[..., None] + j, torch.full_like(take, last, dtype=torch.long))
        old = self.table.gather(-1, col)
        self.table.scatter_(-1, col, torch.where(take, pages, old))
        self.npages = self.npages + need
        self.free_top = self.free_top - flat_need.sum()
        self.free_bound -= int(need.shape[0] * need.shape[1]) * max_per_row

    def _release(self, keep_pages: torch.Tensor) -> None:
        """Return the pages of row ``(b, h)`` beyond ``keep_pages[b, h]`` to the free stack."""
        cols = torch.arange(self.table.shape[-1], device=self.table.device)
        give = (cols >= keep_pages[..., None]) & (cols < self.npages[..., None])  # (B, H, T)
        flat_give = give.flatten()
        rank = flat_give.long().cumsum(0) - 1
        trash = self.free.shape[0] - 1
        index = torch.where(flat_give, self.free_top + rank, torch.full_like(rank, trash))
        self.free.scatter_(0, index, torch.where(flat_give, self.table.flatten(), self.free[trash]))
        self.free_top = self.free_top + flat_give.long().sum()
        self.table = torch.where(give, torch.zeros_like(self.table), self.table)
        self.npages = torch.minimum(self.npages, keep_pages)

    # ------------------------------------------------------------------ capacity
    def resize(self, capacity: int, lengths: torch.Tensor | None = None) -> None:
        """Address ``capacity`` logical slots.

        With ``lengths``, row ``(b, h)`` holds exactly the pages its ``lengths[b, h]`` used slots
        need (more are allocated, extra ones returned).
        """
        self.capacity = capacity
        self._widen_table(-(-capacity // self.page_size) + 1)
        if lengths is None:
            return
        want = (lengths + self.page_size - 1) // self.page_size
        need = (want - self.npages).clamp_min(0)
        self._allocate(need, int(need.max()) if need.numel() else 0)
        self._release(want)
        self.free_bound = int(self.free_top)
        self.decode_steps_left = self._decode_budget(self.free_bound)

    def _decode_budget(self, free: int) -> int:
        """Decode steps that ``free`` pages surely cover.

        A row opens a page at most once per ``page_size`` appends, so ``k`` steps take at most
        ``rows * ceil(k / page_size)`` pages.
        """
        return self.page_size * (free // max(1, self.batch * self.heads))

    def prepare_decode(self, lengths: torch.Tensor) -> None:
        """Before a decode step: rows whose next append opens a new page get one.

        The host reads the free-page count back only when the budget of steps it surely covers is
        spent (about once per ``page_size`` steps); the pool then grows to one free page per (row,
        head), so free pages never exceed that (a copy of the pool every ``page_size`` steps at
        most, against attention reading every live page every step).
        """
        if self.decode_steps_left <= 0:
            rows = self.batch * self.heads
            free = int(self.free_top)
            if free < rows:
                self._grow_pool(rows - free)
                free = int(self.free_top)
            self.free_bound = free
            self.decode_steps_left = self._decode_budget(free)
        self._pop((lengths >= self.npages * self.page_size).long(), 1)
        self.decode_steps_left -= 1

    # ------------------------------------------------------------------ addressing
    def _flat(self, slot: torch.Tensor) -> torch.Tensor:
        """(B, H, n) logical slots -> rows of the pool viewed as (N * P, D) (trash if not held)."""
        page_col = slot // self.page_size
        held = page_col < self.npages[..., None]
        page = self.table.gather(-1, page_col.clamp(max=self.table.shape[-1] - 1))
        page = torch.where(held, page, torch.zeros_like(page))
        return page * self.page_size + slot % self.page_size

    def write(self, slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:  # noqa: D102
        flat = self._flat(slot).flatten()
        d = self.head_dim
        _bits(self.pool_k).view(-1, d).index_copy_(0, flat, _bits(self.codec.encode(key, 0)).reshape(-1, d))
        _bits(self.pool_v).view(-1, d).index_copy_(0, flat, _bits(self.codec.encode(value, 1)).reshape(-1, d))

    def raw(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather slots ``[start, end)`` of every row, ``(B, H, n, D)`` in the storage dtype."""
        slots = torch.arange(start, end, device=self.table.device).expand(self.batch, self.heads, -1)
        flat = self._flat(slots)
        d = self.head_dim
        k = _bits(self.pool_k).view(-1, d)[flat].view(self.pool_k.dtype)
        v = _bits(self.pool_v).view(-1, d)[flat].view(self.pool_v.dtype)
        return k, v

    def read(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather slots ``[start, end)`` of every row into ``(B, H, n, D)`` (the exact CPU path)."""
        k, v = self.raw(start, end)
        return self.codec.decode(k, 0, dtype), self.codec.decode(v, 1, dtype)

    # ------------------------------------------------------------------ batch edits
    def select_rows(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]``, copied into pages of its own (beams may diverge)."""
        k, v = self.raw(0, self.capacity)
        npages = self.npages.index_select(0, index)
        k, v = k.index_select(0, index), v.index_select(0, index)
        self._release(torch.zeros_like(self.npages))
        self.batch = int(index.shape[0])
        self.table = self.table.new_zeros(self.batch, self.heads, self.table.shape[-1])
        self.npages = torch.zeros_like(npages)
        self._allocate(npages, int(npages.max()) if npages.numel() else 0)
        slots = torch.arange(self.capacity, device=k.device).expand(self.batch, self.heads, -1)
        flat = self._flat(slots).flatten()
        d = self.head_dim
        _bits(self.pool_k).view(-1, d).index_copy_(0, flat, _bits(k).reshape(-1, d))
        _bits(self.pool_v).view(-1, d).index_copy_(0, flat, _bits(v).reshape(-1, d))

    def clear_row(self, b: int) -> None:
        """Return every page of row ``b``."""
        keep = self.npages.clone()
        keep[b] = 0
        self._release(keep)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (pages in use, free pages and the trash page)."""
        return (self.pool_k.numel() + self.pool_v.numel()) * self.pool_k.element_size()

    def row_bytes(self, b: int) -> int:
        """Bytes of the pages row ``b`` holds."""
        per_page = 2 * self.page_size * self.head_dim * self.pool_k.element_size()
        return int(self.npages[b].sum()) * per_page
