"""The teacher's distribution per training row, computed once and kept on disk (a CPU speed-up).

The teacher is the model with eviction disabled (and LoRA deltas, if any, switched off): its logits
on a row never change while the base weights are frozen, so a row's teacher forward is done the
first time the row is seen and stored as the ``k`` largest log-probabilities per position, their
token ids and the log of the remaining probability mass
(:class:`~modelopt_dms.training.fused_kl.TopKTeacher`). Later epochs and other runs on the same
rows (ablations) read it back instead of running the teacher.

What it changes: the KL becomes KL_k (top-k outcomes plus one merged "tail" outcome), a lower bound
of the full KL that equals it when the teacher puts no mass outside its top k; the student's own
distribution is still normalised over the whole vocabulary. Only valid while the base weights are
frozen (``train_all_weights: false``): the trainer refuses the combination.

Files: ``<folder>/row_<i>.safetensors`` (no pickle), written atomically; ``<folder>`` is keyed by the
model, the rows and ``k``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..fileio import atomic_save_safetensors
from .fused_kl import TopKTeacher
from .teacher import teacher_mode

__all__ = ["TeacherCache", "teacher_cache_folder"]


def teacher_cache_folder(root: str | Path, model_key: str, rows: torch.Tensor, k: int) -> Path:
    """``root/<digest>``: the digest covers the model identity, every row's tokens and ``k``."""
    digest = hashlib.sha256()
    digest.update(json.dumps([model_key, int(k), list(rows.shape)]).encode())
    digest.update(rows.contiguous().numpy().tobytes())
    return Path(root) / digest.hexdigest()[:20]


class TeacherCache:
    """Top-k teacher distributions of training rows; :meth:`get` computes missing rows once."""

    def __init__(self, folder: str | Path, k: int) -> None:
        self.folder = Path(folder)
        self.k = k
        self.hits = 0
        self.misses = 0

    def _path(self, row: int) -> Path:
        return self.folder / f"row_{row}.safetensors"

    def _load(self, row: int) -> dict[str, torch.Tensor] | None:
        path = self._path(row)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):
            return None  # a damaged entry is recomputed

    @torch.no_grad()
    def _compute(self, model: nn.Module, batch: dict, missing: list[int]) -> None:
        kw = {k: batch[k][missing] for k in ("position_ids", "attention_mask") if k in batch}
        with teacher_mode(model):
            logits = model(input_ids=batch["input_ids"][missing], use_cache=False, **kw).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top, idx = logprobs.topk(self.k, dim=-1)
        tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
        rows = batch["rows"].tolist()
        for j, i in enumerate(missing):
            atomic_save_safetensors(
                {"logprobs": top[j].cpu(), "indices": idx[j].to(torch.int32).cpu(), "tail": tail[j].cpu()},
                self._path(rows[i]),
            )

    def get(self, model: nn.Module, batch: dict, keep: slice = slice(None)) -> TopKTeacher:
        """The teacher of the batch's rows (positions ``keep``), flattened to ``(B * T', k)``."""
        rows = batch["rows"].tolist()
        entries = [self._load(r) for r in rows]
        missing = [i for i, e in enumerate(entries) if e is None]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            self._compute(model, batch, missing)
            entries = [self._load(r) for r in rows]
        device = batch["input_ids"].device
        lp = torch.stack([e["logprobs"][keep] for e in entries]).to(device)
        idx = torch.stack([e["indices"][keep] for e in entries]).to(device).long()
        tail = torch.stack([e["tail"][keep] for e in entries]).to(device)
        return TopKTeacher(lp.reshape(-1, self.k), idx.reshape(-1, self.k), tail.reshape(-1))
