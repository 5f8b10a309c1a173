"""``modelopt-dms select RECIPE --target CR --out DIR``: the run's adapter snapshot for a target CR."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..export.adapters import copy_adapters, load_adapters
from ..fileio import atomic_write_json
from ..loading import load_model
from ..model_dms import apply_dms, dms_config
from ..outputs import ensure_writable_parent, user_path
from ..training.calibration import Calibration, calibrate_decision_offset
from ..training.recipe import load_train_recipe
from ..training.selection import (
    SnapshotScore,
    list_snapshots,
    pareto_front,
    select_snapshot,
    snapshots_to_score,
    uncompressed_logits,
)
from .train import data_rows

__all__ = ["selection_rows", "select_from_recipe"]


def selection_rows(recipe, tok, context: int, rows: int) -> torch.Tensor:
    """``(rows, context)`` ids from the end of the recipe's *training* split (never held-out files)."""
    seqs, _ = data_rows(recipe.data, tok, context, "train", None)
    if seqs.shape[0] < rows:
        raise ValueError(
            f"the training text holds {seqs.shape[0]} rows of {context} tokens, {rows} requested: "
            "lower --rows or --context."
        )
    return seqs[-rows:]


def select_from_recipe(
    recipe_path: str,
    target: float,
    out: str,
    context: int = 2048,
    rows: int = 2,
    log: Callable[[str], None] = print,
    calibrate: bool = False,
    margin: float = 0.05,
    from_step: int = 0,
    candidate_cr: float | None = None,
) -> dict[str, Any]:
    """Score the snapshots of the recipe's run, save the chosen adapters to ``out``; returns the record.

    ``from_step``: score only the snapshots at this step or later (a run made longer: the earlier
    ones were scored by the previous selection, whose record holds their numbers).
    ``calibrate``: move each candidate's decision threshold (``logit_offset``) so that its CR on the
    same rows is just above ``target x (1 + margin)``
    (:func:`~modelopt_dms.training.calibration.calibrate_decision_offset`) and keep the lowest KL
    there; the candidates are the snapshots no other beats on both CR and KL
    (:func:`~modelopt_dms.training.selection.pareto_front`), since a snapshot past the target can
    calibrate to a lower KL than the one nearest it. The artifact records the threshold.
    The record (every snapshot's CR and KL, the choice, the calibration, the tokens trained up to
    the chosen step) is also written to ``<output.dir>/selection_cr<target>.json`` and, next to the
    adapters, to ``<out>/selection.json``.
    """
    if not target >= 1.0:
        raise ValueError(f"--target is a compression ratio >= 1, got {target}")
    if candidate_cr is not None and not (calibrate and 1.0 <= candidate_cr <= target):
        raise ValueError(
            f"--candidate-cr {candidate_cr} needs --calibrate and a CR between 1 and --target ({target})"
        )
    floor = target if candidate_cr is None else candidate_cr
    recipe = load_train_recipe(recipe_path)
    run_dir = user_path(recipe.output.dir)
    if not list_snapshots(run_dir):  # before loading the model (this message names the recipe)
        raise ValueError(
            f"{run_dir} has no adapter snapshots: set train.snapshot_every (e.g. 25) in {recipe_path}, "
            "run it, then select."
        )
    scored = len(snapshots_to_score(run_dir, from_step))  # a --from-step past the last: refused here
    out_path = user_path(out)
    ensure_writable_parent(out_path, "--out")
    model, tok = load_model(recipe.model.name_or_path, dtype=getattr(torch, recipe.model.dtype))
    model = apply_dms(model, recipe.dms)
    ids = selection_rows(recipe, tok, context, rows)
    log(f"[select] {scored} snapshots of {run_dir} on {rows} x {context} training-split tokens")
    reference = uncompressed_logits(model, ids)  # the base weights', before any LoRA merge
    window = recipe.dms.window_size
    base = copy.deepcopy(model) if calibrate else None  # each candidate is calibrated on a fresh copy
    choice, scores = select_snapshot(
        model, run_dir, ids, floor, window, log, reference, from_step, load_choice=not calibrate
    )
    calibration, config, candidates = None, None, []
    if calibrate:
        del model
        front = pareto_front(scores, floor)
        candidates = _calibrate_front(base, front, ids, target, window, reference, margin, log)
        choice, calibration, config = _lowest_calibrated_kl(candidates)
    # the scored snapshot itself: its LoRA deltas, merged into ``model`` while scoring, stay deltas
    copy_adapters(choice.path, out_path, config=config)
    rule = "lowest KL (past the window) among snapshots whose achieved CR >= target"
    if calibrate:
        reach = "target" if candidate_cr is None else f"{floor:g} (--candidate-cr)"
        rule = (
            f"lowest KL (past the window) after calibration, among snapshots whose achieved CR >= {reach} "
            "that no other snapshot beats on both CR and KL"
        )
    record = {
        "recipe": recipe_path,
        "target_compression_ratio": target,
        "context": context,
        "rows": rows,
        "from_step": from_step,
        "candidate_cr": floor if calibrate else None,
        "rule": rule,
        "chosen": choice.to_dict(),
        "snapshots": [s.to_dict() for s in scores],
        "calibration": calibration.to_dict() if calibration else None,
        "calibrated_candidates": [{"step": s.step, **c.to_dict()} for s, c, _ in candidates],
        "adapters": str(out_path),
    }
    summary = Path(run_dir) / "summary.json"  # the run's tokens, to count those up to the chosen step
    if summary.is_file():
        done = json.loads(summary.read_text())
        if done.get("steps") and done.get("tokens"):
            record["tokens"] = int(done["tokens"] * choice.step / done["steps"])
    atomic_write_json(Path(run_dir) / f"selection_cr{target:g}.json", record)
    atomic_write_json(out_path / "selection.json", record)  # travels with the artifact
    log(f"[select] step {choice.step} (CR {choice.compression_ratio:.2f}, KL {choice.kl:.4f}) -> {out_path}")
    if calibration:
        log(
            f"[select] calibrated logit_offset {calibration.offset:+.4f}: "
            f"CR {calibration.compression_ratio:.2f}, KL {calibration.kl:.4f}"
        )
    return record


def _calibrate_front(
    base: torch.nn.Module,
    front: list[SnapshotScore],
    ids: torch.Tensor,
    target: float,
    window: int,
    reference: list[torch.Tensor],
    margin: float,
    log: Callable[[str], None],
) -> list[tuple[SnapshotScore, Calibration, Any]]:
    """Calibrate each front snapshot on a fresh copy of ``base``.

    Those no threshold brings to the goal are logged and skipped (refused when none is left).
    """
    done = []
    for snap in front:
        candidate = copy.deepcopy(base)
        load_adapters(candidate, snap.path)
        log(f"[calibrate] step {snap.step} (CR {snap.compression_ratio:.2f}, KL {snap.kl:.4f})")
        try:
            found = calibrate_decision_offset(candidate, ids, target, window, reference, margin, log=log)
        except ValueError as err:
            log(f"[calibrate] step {snap.step} skipped: {err}")
            continue
        done.append((snap, found, dms_config(candidate)))
    if not done:
        raise ValueError(
            f"no candidate snapshot calibrates to CR {target * (1 + margin):.2f}: lower --target or --margin"
        )
    return done


def _lowest_calibrated_kl(candidates: list[tuple[SnapshotScore, Calibration, Any]]) -> tuple:
    """``(snapshot, calibration, config)`` of the candidate with the lowest calibrated KL (later on a tie)."""
    return min(candidates, key=lambda c: (c[1].kl, -c[0].step))
