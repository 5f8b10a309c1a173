"""Slot bookkeeping of one DMS cache layer, vectorised over (batch row, KV head).

Every (row, KV head) owns the logical slots ``0 .. length-1`` (dense: no holes). Per slot: the
token's position and its eviction flag; per row: the real tokens seen; per (row, head): a ring of
the ``W = w + 1`` newest tokens' slots (``ring[p % W]`` is the slot of position ``p``).

Invariants (docs/design.md §2), after ``n`` real tokens of a row: the ``W`` newest tokens are kept;
an older token ``k`` is kept iff ``d_{k+1} = 0``; the newest token's flag is pending (False) until
the next real token of the row arrives. Padding never enters and never counts.

Nothing here loops over rows or heads, and the decode step reads nothing back to the host; a
prefill chunk reads one number (the longest row) to size the storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..nn.masks import shift_to_next_real

__all__ = ["ChunkPlan", "DecodePlan", "RowBook"]


@dataclass
class DecodePlan:
    """Where the new token of every (row, head) goes in a decode step."""

    slot: torch.Tensor  # (B, H) int64 logical slot written (rows without a real token: a scratch slot)
    real: torch.Tensor  # (B,) bool


@dataclass
class ChunkPlan:
    """What a multi-token call stores: the slot of every new token."""

    dest: torch.Tensor  # (B, H, m) int64 slot of each new token (non-survivors: the scratch slot)


class RowBook:
    """Positions, flags, lengths and the window ring of one layer (see the module docstring)."""

    def __init__(self, batch: int, heads: int, window: int, device: torch.device) -> None:
        self.window = window
        self.big_w = window + 1
        self.pos = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.flag = torch.zeros(batch, heads, 0, dtype=torch.bool, device=device)
        self.length = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.ring = torch.full((batch, heads, self.big_w), -1, dtype=torch.long, device=device)
        self.max_length_bound = 0  # host-side upper bound of length.max()
        self.version = 0  # host-side count of edits: views derived from the book (masks) check it
        # ring offsets of t - 1 and of t - W (≡ t mod W), for the decode step
        self.ring_offsets = torch.tensor([-1, 0], dtype=torch.long, device=device)

    # ------------------------------------------------------------------ shape
    @property
    def capacity(self) -> int:
        """Logical slots per (row, head) the metadata (and the storage) holds."""
        return self.pos.shape[-1]

    @property
    def batch(self) -> int:  # noqa: D102
        return self.seen.shape[0]

    @property
    def heads(self) -> int:  # noqa: D102
        return self.length.shape[1]

    def resize(self, capacity: int) -> None:
        """Grow or shrink the per-slot tensors to ``capacity`` slots (used slots are kept)."""
        old = self.capacity
        if capacity == old:
            return
        keep = min(old, capacity)
        pos = self.pos.new_zeros(self.batch, self.heads, capacity)
        flag = self.flag.new_zeros(self.batch, self.heads, capacity)
        pos[..., :keep] = self.pos[..., :keep]
        flag[..., :keep] = self.flag[..., :keep]
        self.pos, self.flag = pos, flag
        self.version += 1

    def refresh_bound(self) -> int:
        """Exact ``length.max()`` (one host read); done at prefill and when capacity may grow."""
        self.max_length_bound = int(self.length.max()) if self.length.numel() else 0
        return self.max_length_bound

    # ------------------------------------------------------------------ shared pieces
    def _ring_at(self, index: torch.Tensor) -> torch.Tensor:
        """``ring[b, h, index[b] % W]`` -> (B, H)."""
        idx = (index % self.big_w)[:, None, None].expand(-1, self.heads, 1)
        return self.ring.gather(-1, idx).squeeze(-1)

    def settle_pending(self, first_decision: torch.Tensor, has_new: torch.Tensor | None) -> None:
        """The first new decision of a row settles the pending flag of its previous newest token.

        ``has_new``: ``(B,)`` rows with a real new token (None: every row).
        """
        if self.capacity == 0:
            return  # nothing stored yet: no pending flag
        settle = self.seen >= 1 if has_new is None else has_new & (self.seen >= 1)  # (B,)
        prev = self._ring_at(self.seen - 1).clamp_min(0)[..., None]  # (B, H, 1)
        old = self.flag.gather(-1, prev)
        new = torch.where(settle[:, None, None], first_decision[..., None], old)
        self.flag.scatter_(-1, prev, new)
        self.version += 1

    # ------------------------------------------------------------------ decode
    def plan_decode(self, decisions: torch.Tensor, real: torch.Tensor | None) -> DecodePlan:
        """One token per row. ``decisions``: (B, H) bool ``d_t``; ``real``: (B,) bool (None: all).

        The token leaving the window (position ``t - W``, whose slot is ``ring[t % W]``) gives up
        its slot if flagged; otherwise the new token is appended. The first decision settles the
        pending flag of token ``t - 1`` (slot ``ring[(t - 1) % W]``). Requires ``capacity >=
        max_length_bound + 1`` (the caller ensures it). Written for few, batched ops.
        """
        t = self.seen
        heads = self.heads
        ring_idx = (t[:, None] + self.ring_offsets) % self.big_w  # (B, 2): ring of t - 1 and of t - W
        ring_idx = ring_idx[:, None, :].expand(-1, heads, 2)
        prev_leave = self.ring.gather(-1, ring_idx)  # (B, H, 2): slots of t - 1 and of t - W
        # a ring entry is -1 until its position is written (and again once a chunk moved past it),
        # so ">= 0" alone says "t >= 1" / "t >= W" and that the token is stored
        ok = prev_leave >= 0
        if real is not None:
            ok = ok & real[:, None, None]
        slots2 = prev_leave.clamp_min(0)
        flags2 = self.flag.gather(-1, slots2)  # flags of t - 1 (still pending) and of t - W
        # the leaving token is t - W >= 1 behind, never t - 1: its flag is already settled
        reuse = (ok & flags2)[..., 1]
        slot = torch.where(reuse, slots2[..., 1], self.length)  # rows without a token: the first free slot
        slot_col = slot[..., None]  # (B, H, 1)
        # t - 1 settles to d_t (rows without it rewrite the old flag of slot 0), then the new token
        # is pending (False); t - 1 and the new token never share a slot
        settled = torch.where(ok[..., :1], decisions[..., None], flags2[..., :1])
        self.flag.scatter_(-1, slots2[..., :1], settled)
        self.flag.scatter_(-1, slot_col, False)
        self.pos.scatter_(-1, slot_col, t.view(-1, 1, 1).expand(-1, heads, 1))
        ring_entry = slot_col  # rows without a real token keep theirs
        if real is not None:
            ring_entry = torch.where(real[:, None, None], slot_col, prev_leave[..., 1:])
        self.ring.scatter_(-1, ring_idx[..., 1:], ring_entry)
        # in place: a decode step keeps every state tensor where it is (CUDA-graph replay reads
        # and writes the same addresses every step; see graphs.py)
        if real is None:
            self.length.add_(~reuse)
            self.seen.add_(1)
        else:
            self.length.add_(~reuse & real[:, None])
            self.seen.add_(real)
        self.max_length_bound += 1
        self.version += 1
        return DecodePlan(slot=slot, real=real)

    # ------------------------------------------------------------------ prefill chunk
    def new_positions(self, real: torch.Tensor | None, m: int) -> torch.Tensor:
        """Positions of a call's ``m`` tokens, ``(B, m)``: real tokens count on from ``seen``.

        ``real`` None: every token is real (no padding in the call).
        """
        if real is None:
            return self.seen[:, None] + torch.arange(m, device=self.seen.device)
        return self.seen[:, None] + real.long().cumsum(-1) - 1

    def chunk_flags(
        self, decisions: torch.Tensor, real: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first decision (B, H), new tokens' flags (B, H, m))`` of a call.

        Token ``j`` takes the decision of the next real token of the call; the last real token
        stays pending. ``real`` None: every token is real.
        """
        m = decisions.shape[-1]
        if real is None:
            flags = shift_to_next_real(decisions, False) if m > 1 else torch.zeros_like(decisions)
            return decisions[..., 0], flags
        first = real.long().argmax(-1)  # (B,) first real index (0 if none: unused then)
        first_decision = decisions.gather(-1, first[:, None, None].expand(-1, self.heads, 1)).squeeze(-1)
        flags = shift_to_next_real(decisions, False, real) if m > 1 else torch.zeros_like(decisions)
        return first_decision, flags & real[:, None, :]

    def plan_chunk(
        self,
        decisions: torch.Tensor,
        real: torch.Tensor | None,
        ensure: Callable[[int, torch.Tensor], None],
        new_flag: torch.Tensor | None = None,
    ) -> ChunkPlan:
        """Store a call of ``m`` tokens (after its attention ran on the pre-call state).

        ``ensure(slots, per_row)`` must give every row at least ``slots`` logical slots (storage
        for ``per_row[b, h]`` used slots); it is called once, with the peak of this call.
        ``new_flag``: the call's flags from :meth:`chunk_flags` when the caller already settled the
        pending flag with them (:meth:`settle_pending`); otherwise both are done here.

        Candidates for eviction are the past window (``W`` slots) and the new tokens only: older
        survivors are unflagged and stay. Flagged tokens that left the window are dropped; new
        survivors fill the freed slots first, then append. Rows stay dense without moving a slot:
        a row's ``W`` newest tokens are always kept, so the new tokens among them outnumber the
        window tokens that left (``n_new >= min(n_real, W) >= n_left >= n_free``) and every freed
        slot is refilled. Capacity is adjusted here.
        ``real`` None: every token is real.
        """
        bsz, heads, m = decisions.shape
        big = torch.iinfo(torch.long).max
        n_real = m if real is None else real.long().sum(-1)  # (B,) or every row's m
        has_new = None if real is None else n_real > 0
        if new_flag is None:
            first_decision, new_flag = self.chunk_flags(decisions, real)
            self.settle_pending(first_decision, has_new)
        newest = self.seen + n_real - 1  # (B,)
        horizon = (newest - self.big_w)[:, None, None]  # tokens at pos <= horizon left the window

        # past window: tokens out of the window now lose their ring entry; flagged ones their slot
        ring_ok = self.ring >= 0
        ring_slot = self.ring.clamp_min(0)
        ring_pos = self.pos.gather(-1, ring_slot) if self.capacity else torch.zeros_like(ring_slot)
        ring_flag = self.flag.gather(-1, ring_slot) if self.capacity else torch.zeros_like(ring_ok)
        left = ring_ok & (ring_pos <= horizon)  # only rows with new tokens have any
        freed = left & ring_flag
        freed_sorted = torch.where(freed, self.ring, big).sort(-1).values  # (B, H, W)
        n_free = freed.long().sum(-1)  # (B, H)
        self.ring = torch.where(left, torch.full_like(self.ring, -1), self.ring)

        # new tokens: kept unless flagged and already out of the window
        new_pos = self.new_positions(real, m)[:, None, :].expand(-1, heads, -1)  # (B, H, m)
        keep_new = ~(new_flag & (new_pos <= horizon))
        if real is not None:
            keep_new = keep_new & real[:, None, :]
        rank = keep_new.long().cumsum(-1) - 1  # (B, H, m)
        n_new = keep_new.long().sum(-1)  # (B, H)
        new_length = self.length + n_new - n_free

        # capacity: the longest row during this call, plus one scratch slot; one host read gives it
        # and the longest row after the call
        peak = torch.maximum(self.length, new_length)
        if has_new is not None:  # rows without a real token keep their length
            new_length = torch.where(has_new[:, None], new_length, self.length)
        peak_max = longest = 0
        if peak.numel():
            peak_max, longest = torch.stack([peak.max(), new_length.max()]).tolist()
        ensure(peak_max + 1, peak)
        scratch = self.capacity - 1

        use_freed = rank < n_free[..., None]
        from_freed = freed_sorted.gather(-1, rank.clamp(0, self.big_w - 1))
        appended = self.length[..., None] + rank - n_free[..., None]
        dest = torch.where(use_freed, from_freed, appended)
        dest = torch.where(keep_new, dest, torch.full_like(dest, scratch))
        self.pos.scatter_(-1, dest, new_pos)
        self.flag.scatter_(-1, dest, new_flag)
        # the new tokens among the W newest positions of the row get their ring entries
        in_window = keep_new & (new_pos > horizon)
        ring_idx = torch.where(in_window, new_pos % self.big_w, torch.full_like(new_pos, self.big_w))
        ring_ext = torch.cat([self.ring, self.ring.new_full((bsz, heads, 1), -1)], dim=-1)
        ring_ext.scatter_(-1, ring_idx, torch.where(in_window, dest, torch.full_like(dest, -1)))
        self.ring = ring_ext[..., : self.big_w].contiguous()

        self.length = new_length
        self.seen = self.seen + n_real
        self.max_length_bound = longest
        self.version += 1
        return ChunkPlan(dest=dest)

    # ------------------------------------------------------------------ batch edits
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat batch rows: row ``i`` becomes old row ``index[i]`` (beams)."""
        self.pos = self.pos.index_select(0, index)
        self.flag = self.flag.index_select(0, index)
        self.length = self.length.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
        self.ring = self.ring.index_select(0, index)
        self.version += 1

    def clear_row(self, b: int) -> None:
        """Forget row ``b`` (a finished sequence): no tokens, no slots."""
        self.length[b] = 0
        self.seen[b] = 0
        self.ring[b] = -1
        self.pos[b] = 0
        self.flag[b] = False
        self.version += 1
