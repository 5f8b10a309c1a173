"""Greedy generation on ONNX Runtime with a compact DMS KV cache.

:class:`OnnxDMSGenerator` drives the step graph written by :func:`modelopt_dms.export.onnx.export_onnx`.
The cache is the same per-layer bookkeeping as the PyTorch :class:`~modelopt_dms.DMSCache`
(:class:`~modelopt_dms.cache.layer.DMSCacheLayer`, docs/design.md §2), batched over rows and KV heads
with no Python loop over them: after each graph call the layer stores the new tokens (the first new
decision settles the pending flag, a decode step reuses the slot of the flagged token leaving the
window, a prefill chunk compacts only the window and the chunk).

The graph's past inputs are the layer's own tensors, bound in place through ONNX Runtime I/O
binding (keys/values ``(B, Hkv, C, D)``, positions, flags; ``past_valid`` marks used slots and
``past_last`` the newest token's slot), and its outputs are bound into ONNX Runtime-owned buffers
read without copies, so no step copies a layer's whole cache into new arrays.

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
import torch

from ..cache.layer import DMSCacheLayer

__all__ = ["GenerationResult", "OnnxDMSGenerator"]

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
}
_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}


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


class OnnxDMSGenerator:
    """Greedy DMS generation with ONNX Runtime and a compact, self-managed KV cache.

    Args:
        onnx_path: a step graph written by :func:`~modelopt_dms.export.onnx.export_onnx`.
        window_size: DMS window ``w``; ``None`` reads it from the file's metadata (a given value must match).
        num_layers: number of decoder layers; ``None`` reads it from the metadata (a given value must match).
        providers: ONNX Runtime execution providers (default CPU).
        prefill_chunk_size: feed prompts in chunks of this many tokens (``None``: one call).
        session_options: optional ``onnxruntime.SessionOptions``.
        block_size: capacity step of the cache storage, in tokens.

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
        block_size: int = 64,
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
        self.block_size = block_size
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._input_names = set(inputs)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every sequence (the next call starts new ones)."""
        self._layers: list[DMSCacheLayer] | None = None
        self._seen: np.ndarray | None = None
        self._unfed: np.ndarray | None = None

    @property
    def batch_size(self) -> int | None:
        """Batch size of the current sequences, or None before the first call."""
        return None if self._seen is None else int(self._seen.shape[0])

    def _init_state(self, batch: int) -> None:
        # Unconverted layers store like DMS layers whose decisions are all False: they keep everything.
        like = torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=_TORCH[self.dtype])
        self._layers = []
        for _ in range(self.num_layers):
            layer = DMSCacheLayer(
                self.window_size, "blocked", block_size=self.block_size, prefill_chunk_size=None
            )
            layer.init_storage(like)
            self._layers.append(layer)
        self._seen = np.zeros(batch, np.int64)

    def stats(self) -> dict[str, Any]:
        """Token and byte accounting of the cache (DMS layers), like :func:`modelopt_dms.cache_stats`."""
        if self._layers is None:
            raise ValueError("No sequence yet: call step() or generate() first.")
        kept = np.stack([self._layers[i].book.length.numpy() for i in self.dms_layers]).astype(np.int64)
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
        binding = self.session.io_binding()
        keep_alive = [torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(positions)]
        self._bind(binding, "input_ids", keep_alive[0])
        self._bind(binding, "position_ids", keep_alive[1])
        for i, layer in enumerate(self._layers):
            for name, tensor in self._past(i, layer).items():
                keep_alive.append(tensor)
                self._bind(binding, name, tensor)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = dict(zip(self._output_names, binding.get_outputs(), strict=True))
        real = torch.from_numpy(offsets[None] < lens[:, None])
        for i, layer in enumerate(self._layers):
            new_key = torch.from_numpy(outs[f"new_key_{i}"].numpy())
            new_value = torch.from_numpy(outs[f"new_value_{i}"].numpy())
            decisions = torch.from_numpy(outs[f"decisions_{i}"].numpy())
            layer.store(new_key, new_value, decisions, real)
        self._seen = seen + lens
        return outs["logits"].numpy()

    def _past(self, i: int, layer: DMSCacheLayer) -> dict[str, Any]:
        """Graph inputs of layer ``i``: the layer's own tensors (capacity ``C``, used slots marked)."""
        book, kv = layer.book, layer.kv
        slots = torch.arange(book.capacity)
        newest = book.ring.gather(-1, ((book.seen - 1) % book.big_w)[:, None, None].expand(-1, book.heads, 1))
        has_token = (book.seen >= 1)[:, None, None]
        return {
            f"past_key_{i}": kv.k,
            f"past_value_{i}": kv.v,
            f"past_pos_{i}": book.pos,
            f"past_flag_{i}": book.flag,
            f"past_valid_{i}": slots < book.length[..., None],
            f"past_last_{i}": (slots == newest) & has_token,
        }

    def _bind(self, binding: Any, name: str, value: np.ndarray | torch.Tensor) -> None:
        """Bind an input in place, by address (no copy), if the graph reads it.

        Exporters prune unread inputs, so not every name is bound.
        """
        if name not in self._input_names:
            return
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        tensor = tensor.contiguous()
        binding.bind_input(name, "cpu", 0, _NUMPY[tensor.dtype], list(tensor.shape), tensor.data_ptr())

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
