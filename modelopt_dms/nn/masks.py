"""DMS attention masks and the masked dense attention they feed (docs/design.md §2).

Shapes: decisions and logits are ``(batch, kv_heads, positions)``; masks and biases are
``(batch, kv_heads, queries, keys)`` and are shared by the query heads of a GQA group.
Key ``k`` is governed by the decision emitted at position ``k + 1``; the newest key is pending.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dense_visibility",
    "document_continuation",
    "next_real_index",
    "diagonal_validity",
    "shift_to_next_real",
    "hard_visibility",
    "log_keep_probability",
    "soft_eviction_bias",
    "grouped_attention",
]


def next_real_index(valid: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: index of the next real position after ``k`` (``T`` if none)."""
    bsz, num = valid.shape
    idx = torch.arange(num, device=valid.device).expand(bsz, num)
    cand = torch.where(valid, idx, num)
    later = torch.cat([cand[:, 1:], torch.full_like(cand[:, :1], num)], dim=-1)
    return later.flip(-1).cummin(-1).values.flip(-1)


def shift_to_next_real(
    x: torch.Tensor,
    fill: float | bool,
    valid: torch.Tensor | None = None,
    cont: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[..., k] = x[..., next(k)]`` with ``next(k)`` the next real position after ``k``.

    Without ``valid`` every position is real (``next(k) = k + 1``). Keys without a later real
    token (the pending newest one) get ``fill``, and so do keys whose next real token starts
    another document (``cont[b, k]`` False; see :func:`document_continuation`). ``valid`` and
    ``cont`` are ``(B, T)``, ``x`` is ``(B, H, T)``.
    """
    if valid is None:
        pad = torch.full_like(x[..., :1], fill)
        y = torch.cat([x[..., 1:], pad], dim=-1)
    else:
        num = valid.shape[1]
        nxt = next_real_index(valid)
        gathered = torch.gather(x, -1, nxt.clamp(max=num - 1)[:, None, :].expand_as(x))
        y = torch.where((nxt < num)[:, None, :], gathered, torch.full_like(gathered, fill))
    if cont is not None:
        y = torch.where(cont[:, None, :], y, torch.full_like(y, fill))
    return y


def document_continuation(visible: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per key ``(B, T)``: does its next real token (whose decision governs it) see it.

    False where a packed row's document ends (the next token starts another document, which the
    block-diagonal mask hides ``k`` from): that key stays pending. ``visible`` is the model's mask
    as ``(B, 1, T, T)`` booleans over a whole sequence.
    """
    bsz, _, t, _ = visible.shape
    idx = torch.arange(t, device=visible.device)
    nxt = next_real_index(valid) if valid is not None else (idx + 1).expand(bsz, t)
    has = nxt < t
    b = torch.arange(bsz, device=visible.device)[:, None]
    cont = visible[:, 0][b, nxt.clamp(max=t - 1), idx[None, :]]  # vis[b, nxt(k), k]
    return cont | ~has  # no next real token: pending anyway


def _row_offsets(
    num_keys: int, q_index: torch.Tensor, valid: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(q - k)`` counted in real tokens, ``(B or 1, Tq, Tk)``, and the key validity ``(B, 1, Tk)``.

    ``q_index`` are the queries' indices into the key axis. Padding never counts as a token.
    """
    if valid is None:
        k_pos = torch.arange(num_keys, device=device)
        return (q_index[:, None] - k_pos[None, :])[None], None
    real_pos = valid.long().cumsum(-1) - 1  # (B, Tk)
    diff = real_pos[:, q_index, None] - real_pos[:, None, :]
    causal = q_index[:, None] >= torch.arange(num_keys, device=device)[None, :]
    diff = torch.where(causal[None] & valid[:, None, :], diff, torch.full_like(diff, -1))
    return diff, valid[:, None, :]


def hard_visibility(
    decisions: torch.Tensor,
    window_size: int,
    q_positions: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    cont: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference mask: key ``k`` visible to query ``q`` iff ``k <= q``, real, and not evicted.

    Args:
        decisions: ``(B, H, Tk)`` boolean decisions ``d_t`` of every key position ``t``.
        window_size: ``w``; a flagged key stays visible while ``q - k <= w``.
        q_positions: indices of the queries on the key axis (default: all keys are queries).
        valid: optional ``(B, Tk)`` real-token mask. Padding (anywhere, e.g. between turns) is
            invisible, does not count towards the window, and a key is governed by the decision
            of the next *real* token.
        cont: optional ``(B, Tk)``: False where a packed document ends (that key is pending).

    Returns:
        ``(B, H, Tq, Tk)`` boolean mask (True = visible).

    """
    num_keys = decisions.shape[-1]
    if q_positions is None:
        q_positions = torch.arange(num_keys, device=decisions.device)
    diff, _ = _row_offsets(num_keys, q_positions, valid, decisions.device)  # (B|1, Tq, Tk)
    flagged = shift_to_next_real(decisions.bool(), False, valid, cont)[..., None, :]
    return (diff[:, None] >= 0) & ~(flagged & (diff[:, None] > window_size))


def log_keep_probability(
    z: torch.Tensor, valid: torch.Tensor | None = None, cont: torch.Tensor | None = None
) -> torch.Tensor:
    """``log(1 - sigmoid(z_{next(k)}))`` per key ``(B, H, T)``: its soft bias beyond the window.

    0 for the pending newest key and at document ends. Shared by every training kernel.
    """
    return F.logsigmoid(-shift_to_next_real(z, float("-inf"), valid, cont))


def soft_eviction_bias(
    z: torch.Tensor, window_size: int, valid: torch.Tensor | None = None, cont: torch.Tensor | None = None
) -> torch.Tensor:
    """Training bias added to the scaled scores (full sequence, no past).

    ``-inf`` on non-causal (and padding) keys, ``0`` inside the window (``q - k <= w``), and
    ``log(1 - sigmoid(z_{k+1}))`` beyond it. ``z`` is ``(B, H, T)``; returns ``(B, H, T, T)``.
    With ``valid`` (``(B, T)``), distances and the shift count real tokens only; ``cont`` marks
    where a packed document ends (see :func:`document_continuation`).
    """
    num = z.shape[-1]
    diff, _ = _row_offsets(num, torch.arange(num, device=z.device), valid, z.device)
    diff = diff[:, None]  # (B|1, 1, T, T)
    log_keep = log_keep_probability(z, valid, cont)[..., None, :]
    bias = torch.where(diff > window_size, log_keep, torch.zeros_like(log_keep))
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


def _is_block_mask(mask: object) -> bool:
    return type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod")


def _block_mask_entries(mask, b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Evaluate a flex ``BlockMask``'s ``mask_mod`` on broadcastable index tensors (head 0)."""
    return mask.mask_mod(b, torch.zeros_like(b), q, kv).bool()


def dense_visibility(mask, bsz: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """The mask transformers passes to attention as a boolean ``(B, 1, q_len, k_len)`` (True = visible).

    Accepts a 4D bool/float mask (eager, sdpa), a 2D padding mask (``(B, k_len)``, 1 = real: the
    flash-attention convention; only key padding is expressed, causality comes from the caller)
    and a flex-attention ``BlockMask`` (its ``mask_mod`` is evaluated). ``None`` stays ``None``.
    """
    if mask is None:
        return None
    if _is_block_mask(mask):
        device = mask.kv_indices.device
        b = torch.arange(bsz, device=device)[:, None, None, None]
        q = torch.arange(q_len, device=device)[None, None, :, None]
        kv = torch.arange(k_len, device=device)[None, None, None, :]
        return _block_mask_entries(mask, b, q, kv)
    if mask.dim() == 2:
        return mask[:, None, None, -k_len:].bool()
    mask = mask[..., -q_len:, :k_len]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def diagonal_validity(mask, q_len: int, past: int, bsz: int) -> torch.Tensor | None:
    """Which of the ``q_len`` new tokens are real, read off the model's mask (4D, 2D or BlockMask).

    A real token always sees itself, so its diagonal entry is visible; a padding query sees
    nothing. Works with padding anywhere and with sliding-window masks. ``None`` if no mask.
    """
    if mask is None:
        return None
    if _is_block_mask(mask):
        device = mask.kv_indices.device
        b = torch.arange(bsz, device=device)[:, None]
        q = torch.arange(q_len, device=device)[None, :]
        return _block_mask_entries(mask, b, q, past + q).expand(bsz, q_len)
    if mask.dim() == 2:
        return mask[:, -q_len:].bool()
    rows = mask[:, 0, -q_len:, :]
    idx = torch.arange(q_len, device=mask.device)
    diag = rows[:, idx, past + idx]
    if diag.dtype != torch.bool:
        diag = diag > torch.finfo(diag.dtype).min / 2
    return diag.expand(bsz, q_len)
