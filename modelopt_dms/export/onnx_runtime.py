"""Greedy generation on ONNX Runtime with a compact DMS KV cache kept in numpy.

:class:`OnnxDMSGenerator` drives the step graph written by :func:`modelopt_dms.export.onnx.export_onnx`.
It owns the cache and follows docs/design.md §2:

* per (layer, batch row, KV head) a row of slots holding only the kept tokens (key and value after RoPE,
  position, eviction flag); used slots are ``0..n-1`` of the row, slot order does not matter;
* after each graph call the row stores its new tokens, sets the pending flag of its previous newest
  token from the first new decision, gives each new token the decision of its successor (the newest
  stays pending) and evicts flagged tokens that left the window (``pos <= newest - W``, ``W = w + 1``);
* a decode step reuses the slot of the flagged token leaving the window in place, otherwise appends;
  a multi-token step (prefill chunk) compacts the row;
* graph inputs pad each layer's rows to the longest row of that layer (``past_valid`` marks used slots).

Prefill may be chunked (the pending flag is carried from chunk to chunk), batches may hold prompts of
different lengths (short rows are padded at the end with positions no real query can see), and a later
``generate(..., continue_cache=True)`` call continues the same sequences (multi-turn): the last generated
token of the previous call, which greedy decoding never feeds, is fed first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GenerationResult", "OnnxDMSGenerator"]

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GenerationResult:
    """Output of :meth:`OnnxDMSGenerator.generate`.

    Attributes:
        tokens: ``(B, N)`` generated token ids (rows that hit EOS are filled with the pad id).
        step_logits: ``N`` arrays ``(B, V)``: the logits each generated token was chosen from.
        tokens_seen: ``(dms_layers, B, Hkv)`` tokens each cache row has seen so far (all calls).
        tokens_kept: ``(dms_layers, B, Hkv)`` tokens each row keeps (window included).
        compression_ratio: ``tokens_seen.sum() / tokens_kept.sum()`` at the end of the call.
        prefill_seconds / decode_seconds: wall time of the two phases of this call.

    """

    tokens: np.ndarray
    step_logits: list[np.ndarray]
    tokens_seen: np.ndarray
    tokens_kept: np.ndarray
    compression_ratio: float
    prefill_seconds: float
    decode_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class _LayerState:
    """One layer's slots: ``(B, Hkv, capacity, ...)`` arrays, ``n`` used slots, pending slot per row."""

    def __init__(self, batch: int, num_kv: int, head_dim: int, dtype: np.dtype) -> None:
        self.k = np.zeros((batch, num_kv, 0, head_dim), dtype)
        self.v = np.zeros((batch, num_kv, 0, head_dim), dtype)
        self.pos = np.zeros((batch, num_kv, 0), np.int64)
        self.flag = np.zeros((batch, num_kv, 0), bool)
        self.n = np.zeros((batch, num_kv), np.int64)
        self.last = np.full((batch, num_kv), -1, np.int64)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, needed: int) -> None:
        """Grow every row's storage to at least ``needed`` slots (geometric growth)."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 16)

        def grow(a: np.ndarray) -> np.ndarray:
            out = np.zeros((*a.shape[:2], cap, *a.shape[3:]), a.dtype)
            out[:, :, : a.shape[2]] = a
            return out

        self.k, self.v, self.pos, self.flag = grow(self.k), grow(self.v), grow(self.pos), grow(self.flag)

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        """Graph inputs of layer ``i``: rows padded to the longest row of the layer."""
        width = int(self.n.max()) if self.n.size else 0
        slots = np.arange(width)
        return {
            f"past_key_{i}": np.ascontiguousarray(self.k[:, :, :width]),
            f"past_value_{i}": np.ascontiguousarray(self.v[:, :, :width]),
            f"past_pos_{i}": np.ascontiguousarray(self.pos[:, :, :width]),
            f"past_flag_{i}": np.ascontiguousarray(self.flag[:, :, :width]),
            f"past_valid_{i}": slots[None, None, :] < self.n[:, :, None],
            f"past_last_{i}": slots[None, None, :] == self.last[:, :, None],
        }

    def store(self, b: int, h: int, k_new, v_new, d_new, t0: int, big_w: int) -> None:
        """Store ``m`` new tokens (positions ``t0..t0+m-1``) of row ``(b, h)`` with delayed eviction."""
        m = k_new.shape[0]
        if m == 0:
            return
        n = int(self.n[b, h])
        last = int(self.last[b, h])
        if last >= 0:  # the first new decision settles the previous newest token's flag
            self.flag[b, h, last] = bool(d_new[0])
        if m == 1:
            slot = -1
            leaving = t0 - big_w  # the only token that leaves the window on a one-token step
            if leaving >= 0:
                hit = np.flatnonzero(self.pos[b, h, :n] == leaving)
                if hit.size and self.flag[b, h, hit[0]]:
                    slot = int(hit[0])  # delayed eviction: reuse the slot in place
            if slot < 0:
                self.reserve(n + 1)
                slot, n = n, n + 1
            self.k[b, h, slot], self.v[b, h, slot] = k_new[0], v_new[0]
            self.pos[b, h, slot], self.flag[b, h, slot] = t0, False
            self.n[b, h], self.last[b, h] = n, slot
            return
        new_pos = np.arange(t0, t0 + m, dtype=np.int64)
        new_flag = np.concatenate([np.asarray(d_new[1:], bool), [False]])
        pos = np.concatenate([self.pos[b, h, :n], new_pos])
        flag = np.concatenate([self.flag[b, h, :n], new_flag])
        keys = np.concatenate([self.k[b, h, :n], k_new])
        vals = np.concatenate([self.v[b, h, :n], v_new])
        newest = t0 + m - 1
        kept = np.flatnonzero((pos > newest - big_w) | ~flag)  # window, and unflagged older tokens
        cnt = kept.size
        self.reserve(cnt)
        self.k[b, h, :cnt], self.v[b, h, :cnt] = keys[kept], vals[kept]
        self.pos[b, h, :cnt], self.flag[b, h, :cnt] = pos[kept], flag[kept]
        self.n[b, h], self.last[b, h] = cnt, cnt - 1  # the newest token is kept and is the last one


class OnnxDMSGenerator:
    """Greedy DMS generation with ONNX Runtime and a compact, self-managed KV cache.

    Args:
        onnx_path: a step graph written by :func:`~modelopt_dms.export.onnx.export_onnx`.
        window_size: DMS window ``w``; ``None`` reads it from the file's metadata (a given value must match).
        num_layers: number of decoder layers; ``None`` reads it from the metadata (a given value must match).
        providers: ONNX Runtime execution providers (default CPU).
        prefill_chunk_size: feed prompts in chunks of this many tokens (``None``: one call).
        session_options: optional ``onnxruntime.SessionOptions``.

    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        window_size: int | None = None,
        num_layers: int | None = None,
        *,
        providers: Sequence[str] | None = None,
        prefill_chunk_size: int | None = None,
        session_options: Any = None,
    ) -> None:
        import onnxruntime as ort

        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 or None, got {prefill_chunk_size}")
        self.session = ort.InferenceSession(
            os.fspath(onnx_path),
            sess_options=session_options,
            providers=list(providers or ["CPUExecutionProvider"]),
        )
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        self.window_size = _resolve(window_size, meta, "window_size")
        self.num_layers = _resolve(num_layers, meta, "num_layers")
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [f"past_key_{i}" for i in range(self.num_layers) if f"past_key_{i}" not in inputs]
        if missing or f"past_key_{self.num_layers}" in inputs:
            raise ValueError(
                f"{onnx_path} does not hold a {self.num_layers}-layer DMS step graph (missing "
                f"{missing[:3]} or extra layers); export it with modelopt_dms.export.onnx.export_onnx."
            )
        key_in = inputs["past_key_0"]
        self.num_kv_heads = int(key_in.shape[1])
        self.head_dim = int(key_in.shape[3])
        self.dtype = np.dtype(_ORT_FLOAT.get(key_in.type, np.float32))
        self.dms_layers = (
            json.loads(meta["dms_layers"]) if "dms_layers" in meta else list(range(self.num_layers))
        )
        self.prefill_chunk_size = prefill_chunk_size
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._input_names = set(inputs)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every sequence (the next call starts new ones)."""
        self._layers: list[_LayerState] | None = None
        self._seen: np.ndarray | None = None
        self._unfed: np.ndarray | None = None

    @property
    def batch_size(self) -> int | None:
        """Batch size of the current sequences, or None before the first call."""
        return None if self._seen is None else int(self._seen.shape[0])

    def _init_state(self, batch: int) -> None:
        self._layers = [
            _LayerState(batch, self.num_kv_heads, self.head_dim, self.dtype) for _ in range(self.num_layers)
        ]
        self._seen = np.zeros(batch, np.int64)

    def stats(self) -> dict[str, Any]:
        """Token and byte accounting of the cache (DMS layers), like :func:`modelopt_dms.cache_stats`."""
        if self._layers is None:
            raise ValueError("No sequence yet: call step() or generate() first.")
        kept = np.stack([self._layers[i].n for i in self.dms_layers]).astype(np.int64)
        seen = np.broadcast_to(self._seen[None, :, None], kept.shape).astype(np.int64)
        per_token = 2 * self.head_dim * self.dtype.itemsize
        total_kept = int(kept.sum())
        return {
            "tokens_seen": seen,
            "tokens_kept": kept,
            "compression_ratio": float(seen.sum()) / total_kept if total_kept else float("nan"),
            "kv_bytes_kept": total_kept * per_token,
            "kv_bytes_dense": int(seen.sum()) * per_token,
        }

    # ------------------------------------------------------------------ one graph call
    def step(self, input_ids: np.ndarray, lengths: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Run one graph call on new tokens and update the cache; returns logits ``(B, T, V)``.

        Args:
            input_ids: ``(B, T)`` new tokens per row.
            lengths: real new tokens per row (the rest of the row is padding); default all ``T``.

        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, tokens) with tokens >= 1, got shape {ids.shape}")
        bsz, num_new = ids.shape
        if self._layers is None:
            self._init_state(bsz)
        elif bsz != self.batch_size:
            raise ValueError(
                f"The cache holds {self.batch_size} sequences, got a batch of {bsz}; reset() first."
            )
        lens = np.full(bsz, num_new, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if lens.shape != (bsz,) or (lens < 0).any() or (lens > num_new).any():
            raise ValueError(f"lengths must be {bsz} values in [0, {num_new}], got {lengths!r}")
        seen = self._seen
        offsets = np.arange(num_new, dtype=np.int64)
        pad_base = int((seen + num_new).max())  # padding: positions no real query of the call reaches
        positions = np.where(
            offsets[None] < lens[:, None], seen[:, None] + offsets[None], pad_base + offsets[None]
        )
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "position_ids": positions}
        for i, layer in enumerate(self._layers):
            feeds.update(layer.feeds(i))
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}  # exporters prune unread inputs
        outs = dict(zip(self._output_names, self.session.run(self._output_names, feeds), strict=True))
        big_w = self.window_size + 1
        for i, layer in enumerate(self._layers):
            nk, nv, dec = outs[f"new_key_{i}"], outs[f"new_value_{i}"], outs[f"decisions_{i}"]
            for b in range(bsz):
                m = int(lens[b])
                for h in range(self.num_kv_heads):
                    layer.store(b, h, nk[b, h, :m], nv[b, h, :m], dec[b, h, :m], int(seen[b]), big_w)
        self._seen = seen + lens
        return outs["logits"]

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: np.ndarray | Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        continue_cache: bool = False,
    ) -> GenerationResult:
        """Greedy decoding: prefill (chunked if configured), then one token per step.

        Args:
            input_ids: ``(B, T)`` array, or a list of B token lists of any lengths (ragged prompts).
            max_new_tokens: tokens to generate per row.
            eos_token_id: stop a row at this token (or any of these); rows that stop get ``pad_token_id``.
            pad_token_id: filler after EOS (default: the first EOS id).
            continue_cache: keep the cache of the previous call (multi-turn); the previous call's last
                token is fed first. Otherwise the cache is reset.

        Like ``transformers`` ``generate``, the last generated token is not fed through the model, so
        the cache afterwards holds the prompt and all generated tokens but the last.

        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        source = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        rows = [[int(t) for t in r] for r in source]
        if not continue_cache:
            self.reset()
        elif self._unfed is not None:
            if len(rows) != len(self._unfed):
                raise ValueError(f"continue_cache: expected {len(self._unfed)} rows, got {len(rows)}")
            rows = [[int(u)] + r for u, r in zip(self._unfed, rows, strict=True)]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("every row needs at least one prompt token")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        bsz = len(rows)
        lengths = np.array([len(r) for r in rows], np.int64)
        padded = np.full((bsz, int(lengths.max())), pad, np.int64)
        for b, r in enumerate(rows):
            padded[b, : len(r)] = r

        t0 = time.perf_counter()
        chunk = self.prefill_chunk_size or padded.shape[1]
        last_logits: np.ndarray | None = None
        for start in range(0, padded.shape[1], chunk):
            piece = padded[:, start : start + chunk]
            lens = np.clip(lengths - start, 0, piece.shape[1])
            logits = self.step(piece, lens)
            if last_logits is None:
                last_logits = np.zeros((bsz, logits.shape[-1]), logits.dtype)
            ends = lengths - 1 - start  # index of the row's last prompt token inside this piece
            for b in np.flatnonzero((ends >= 0) & (ends < piece.shape[1])):
                last_logits[b] = logits[b, ends[b]]
        t1 = time.perf_counter()

        tokens = np.zeros((bsz, max_new_tokens), np.int64)
        step_logits: list[np.ndarray] = []
        done = np.zeros(bsz, bool)
        produced = 0
        for s in range(max_new_tokens):
            step_logits.append(last_logits.copy())
            nxt = last_logits.argmax(-1).astype(np.int64)
            nxt[done] = pad
            tokens[:, s] = nxt
            produced = s + 1
            if eos:
                done |= np.isin(nxt, list(eos))
            if s == max_new_tokens - 1 or done.all():
                break
            last_logits = self.step(nxt[:, None])[:, 0]
        t2 = time.perf_counter()
        self._unfed = tokens[:, produced - 1].copy()
        st = self.stats()
        return GenerationResult(
            tokens=tokens[:, :produced],
            step_logits=step_logits,
            tokens_seen=st["tokens_seen"],
            tokens_kept=st["tokens_kept"],
            compression_ratio=st["compression_ratio"],
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            extra={"kv_bytes_kept": st["kv_bytes_kept"], "kv_bytes_dense": st["kv_bytes_dense"]},
        )


def _resolve(value: int | None, meta: dict[str, str], key: str) -> int:
    stored = meta.get(key)
    if value is None:
        if stored is None:
            raise ValueError(f"The ONNX file has no '{key}' metadata; pass {key}= explicitly.")
        return int(stored)
    if stored is not None and int(stored) != int(value):
        raise ValueError(f"{key}={value} does not match the exported graph ({key}={stored}).")
    return int(value)
