"""Adapter snapshots of a run, and the choice of the snapshot for a target compression ratio.

With ``train.snapshot_every`` the trainer writes the decision adapters every N steps to
``<run>/snapshots/step_<N>/`` (the :func:`~modelopt_dms.export.adapters.save_adapters` format). A
schedule that overshoots the target (``train.cr_end`` above ``dms.target_compression_ratio``) passes
through the target during training; :func:`select_snapshot` measures every snapshot with the compact
cache on long text (achieved CR, window included, and the KL to the uncompressed model) and
takes the lowest-KL snapshot whose achieved CR reaches the target. The selection text must not be
the held-out evaluation text (the pipeline uses training-split documents).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..cache import DMSCache, cache_stats
from ..export.adapters import check_adapters, load_adapters
from ..model_dms import eviction_disabled
from ..nn.divergence import kl_per_token

__all__ = [
    "SnapshotScore",
    "drop_snapshots_after",
    "list_snapshots",
    "pareto_front",
    "pick_snapshot",
    "score_snapshot",
    "select_snapshot",
    "snapshot_path",
    "snapshots_to_score",
    "uncompressed_logits",
]

SNAPSHOTS = "snapshots"
_NAME = re.compile(r"^step_(\d{6,})$")


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Folder of the adapters snapshot after ``step`` optimizer steps."""
    return Path(run_dir) / SNAPSHOTS / f"step_{step:06d}"


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every snapshot of a run, by step."""
    root = Path(run_dir) / SNAPSHOTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def snapshots_to_score(run_dir: str | os.PathLike, from_step: int = 0) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run's snapshots at ``from_step`` or later; a clear error if none."""
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(
            f"{run_dir} has no adapter snapshots: train with train.snapshot_every > 0 (e.g. 25), then select."
        )
    later = [(step, folder) for step, folder in snapshots if step >= from_step]
    if not later:
        raise ValueError(
            f"{run_dir} has no snapshot at step >= {from_step} (the last is step {snapshots[-1][0]}): "
            "lower --from-step."
        )
    return later


def drop_snapshots_after(run_dir: str | os.PathLike, step: int) -> list[int]:
    """Remove the run's snapshots past ``step`` (a resumed or restarted run writes them again)."""
    dropped = []
    for s, folder in list_snapshots(run_dir):
        if s > step:
            shutil.rmtree(folder)
            dropped.append(s)
    return dropped


@dataclass
class SnapshotScore:
    """One snapshot measured on the selection text."""

    step: int
    path: str
    compression_ratio: float  # tokens seen / kept, window included, over all rows
    kl: float  # mean KL(uncompressed || DMS) in nats/token over positions past the window

    def to_dict(self) -> dict:  # noqa: D102
        return asdict(self)


@torch.inference_mode()
def score_snapshot(
    model: nn.Module, rows: torch.Tensor, window: int, reference: list[torch.Tensor] | None = None
) -> tuple[float, float, list[torch.Tensor]]:
    """``(achieved CR, KL past the window, reference logits)`` of ``model``'s current adapters.

    ``rows``: ``(N, T)`` token ids, one row at a time through a fresh :class:`DMSCache`.
    ``reference``: the uncompressed model's logits per row from an earlier call (computed if None).
    """
    model.eval()
    device = next(model.parameters()).device
    if reference is None:
        reference = uncompressed_logits(model, rows)
    seen = kept = 0
    kls = []
    for row, ref in zip(rows, reference, strict=True):
        cache = DMSCache()
        logits = model(input_ids=row[None].to(device), past_key_values=cache, use_cache=True).logits
        stats = cache_stats(cache)
        seen += int(stats["tokens_seen"].sum())
        kept += int(stats["tokens_kept"].sum())
        kls.append(kl_per_token(ref, logits)[0, window + 1 :])
    return seen / max(kept, 1), float(torch.cat(kls).mean()), reference


@torch.inference_mode()
def uncompressed_logits(model: nn.Module, rows: torch.Tensor) -> list[torch.Tensor]:
    """Logits of ``model`` under ``eviction_disabled`` per row (the reference KL is taken against)."""
    model.eval()
    device = next(model.parameters()).device
    with eviction_disabled(model):
        return [model(input_ids=r[None].to(device), use_cache=False).logits for r in rows]


def pick_snapshot(scores: list[SnapshotScore], target: float) -> SnapshotScore:
    """The lowest-KL snapshot whose achieved CR is at least ``target`` (later step on a tie)."""
    reached = [s for s in scores if s.compression_ratio >= target]
    if not reached:
        best = max(scores, key=lambda s: s.compression_ratio)
        raise ValueError(
            f"no snapshot reaches CR {target}: the highest is {best.compression_ratio:.2f} (step "
            f"{best.step}). Train longer or with a higher train.cr_end, then select again."
        )
    return min(reached, key=lambda s: (s.kl, -s.step))


def pareto_front(scores: list[SnapshotScore], target: float) -> list[SnapshotScore]:
    """The snapshots at CR >= ``target`` that no other one beats on both CR (higher) and KL (lower).

    Calibrating a threshold trades CR for KL along each snapshot's own curve, so a snapshot past
    the target can end below the one nearest it: these are the ones worth calibrating.
    """
    reached = [s for s in scores if s.compression_ratio >= target]

    def beaten(s: SnapshotScore) -> bool:
        return any(
            o.compression_ratio >= s.compression_ratio
            and o.kl <= s.kl
            and (o.compression_ratio, o.kl) != (s.compression_ratio, s.kl)
            for o in reached
        )

    return [s for s in reached if not beaten(s)]


def select_snapshot(
    model: nn.Module,
    run_dir: str | os.PathLike,
    rows: torch.Tensor,
    target: float,
    window: int,
    log: Callable[[str], None] = print,
    reference: list[torch.Tensor] | None = None,
    from_step: int = 0,
    load_choice: bool = True,
) -> tuple[SnapshotScore, list[SnapshotScore]]:
    """Score the snapshots of ``run_dir`` on ``rows`` and pick one for ``target`` (see the module doc).

    ``model``: the base model with the run's DMS config applied (adapters are loaded into it in
    turn; it ends holding the chosen snapshot's adapters). ``reference``: the base model's
    uncompressed logits on ``rows`` (computed here if None). ``from_step``: score only the
    snapshots at this step or later (those a longer run added). ``load_choice=False`` skips loading
    the choice into ``model`` at the end (for a caller that calibrates candidates on copies and
    discards ``model``; it then holds the last scored adapters, or the base for LoRA runs).
    Returns ``(choice, all scores)``.
    """
    snapshots = snapshots_to_score(run_dir, from_step)
    # the uncompressed reference from the base weights, before any snapshot (LoRA) changes them
    if reference is None:
        reference = uncompressed_logits(model, rows)
    scores = []
    for step, folder in snapshots:
        # LoRA snapshots merge into the weights: each goes onto a fresh copy of the base
        candidate = copy.deepcopy(model) if "lora" in check_adapters(folder) else model
        load_adapters(candidate, folder)
        cr, kl, _ = score_snapshot(candidate, rows, window, reference)
        del candidate
        scores.append(SnapshotScore(step, str(folder), cr, kl))
        log(f"[select] step {step:>6}: CR {cr:.2f}, KL {kl:.4f}")
    choice = pick_snapshot(scores, target)
    if load_choice:
        load_adapters(model, choice.path)
    return choice, scores
