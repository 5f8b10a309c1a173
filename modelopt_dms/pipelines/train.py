"""``modelopt-dms run RECIPE``: load, apply DMS, tokenise real text, train, save adapters, export."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..corpus import build_token_sequences
from ..export.adapters import save_adapters
from ..export.hf_checkpoint import check_export_target
from ..export.onnx import check_onnx_target
from ..fileio import atomic_write_json
from ..loading import load_model
from ..model_dms import apply_dms
from ..outputs import OutputError, ensure_writable_parent, user_path
from ..schema import RecipeError
from ..training.chat_data import mix_chat_sequences
from ..training.recipe import TrainRecipe, load_train_recipe
from ..training.run_folder import RunFolder, run_fingerprint
from ..training.trainer import train
from .export import ExportPlan, check_export_space, run_export_plan

__all__ = ["export_plan_of", "preflight", "run_recipe"]


def export_plan_of(recipe: TrainRecipe) -> ExportPlan:
    """The recipe's ``quantize`` and ``export`` sections as one :class:`ExportPlan`."""
    e, q = recipe.export, recipe.quantize
    return ExportPlan(
        onnx_path=e.onnx_path if e else None,
        quantize_weights=q is not None and q.weights == "fp8",
        quantize_kv=q is not None and q.kv_cache == "fp8",
        hf_dir=e.hf_dir if e else None,
        overwrite=bool(e and e.overwrite),
    )


def _init_distributed() -> tuple[int, int]:
    """Under torchrun: initialise the process group (gloo on CPU, nccl on GPU); ``(world, rank)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world, int(os.environ.get("RANK", "0"))


def _fingerprint(recipe: TrainRecipe, world_size: int) -> dict[str, Any]:
    sections = {
        "model": recipe.model.model_dump(mode="json"),
        "dms": recipe.dms.model_dump(mode="json"),
        "data": recipe.data.model_dump(mode="json"),
        "train": recipe.schedule.model_dump(mode="json"),
    }
    return run_fingerprint(sections, world_size)


def preflight(recipe: TrainRecipe) -> None:
    """Every destination check that needs no model: before loading, tokenising or training."""
    out_dir = user_path(recipe.output.dir)
    ensure_writable_parent(out_dir / "x", "output.dir")
    adapters = user_path(recipe.output.adapters_path)
    if adapters.exists() and not adapters.is_dir():
        raise OutputError(f"output.adapters_dir {adapters} exists and is not a folder; choose another one.")
    ensure_writable_parent(adapters, "output.adapters_dir")
    plan = export_plan_of(recipe)
    if plan.hf_dir:
        check_export_target(plan.hf_dir, plan.overwrite)
    if plan.onnx_path:
        check_onnx_target(plan.onnx_path, plan.overwrite)


def run_recipe(
    path: str, progress: bool = True, log: Callable[[str], None] = print, restart: bool = False
) -> dict[str, Any]:
    """Run a training recipe end to end; returns (and writes to ``<dir>/summary.json``) a summary.

    ``restart`` (or ``train.resume: false``) starts over in a run folder that holds another run.
    """
    recipe = load_train_recipe(path)
    world_size, rank = _init_distributed()
    preflight(recipe)
    out_dir = user_path(recipe.output.dir)
    cfg = recipe.schedule
    folder = RunFolder(out_dir, _fingerprint(recipe, world_size), cfg.steps, restart or not cfg.resume)
    if rank == 0:
        folder.open()
    try:
        return _train_in(recipe, path, str(out_dir), rank, progress, log)
    finally:
        folder.close()


def _train_in(recipe: TrainRecipe, path: str, out_dir: str, rank: int, progress: bool, log) -> dict[str, Any]:
    log(f"[recipe] {path} -> {out_dir}")
    model, tok = load_model(recipe.model.name_or_path, dtype=getattr(torch, recipe.model.dtype))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and recipe.data.seq_len > max_pos:
        raise RecipeError(
            f"data.seq_len = {recipe.data.seq_len} exceeds the model's max_position_embeddings ({max_pos}); "
            "lower data.seq_len."
        )
    model = apply_dms(model, recipe.dms)
    plan = export_plan_of(recipe)
    check_export_space(model, plan)  # before training, not after
    d = recipe.data
    seqs = build_token_sequences(
        tok, d.text_glob, d.seq_len, "train", d.heldout_fraction, d.seed, d.max_sequences, d.cache_dir
    )
    seqs = mix_chat_sequences(tok, seqs, d.chat_fraction, d.recall_fraction, seed=d.seed)
    log(
        f"[data] {seqs.shape[0]} training sequences of {seqs.shape[1]} tokens "
        f"(chat {d.chat_fraction:.0%}, recall {d.recall_fraction:.0%})"
    )
    cfg = recipe.schedule
    t0 = time.time()
    history = train(model, seqs, cfg, out_dir, progress=progress)
    elapsed = time.time() - t0
    if rank != 0:
        return {"rank": rank}
    adapters_dir = user_path(recipe.output.adapters_path)
    save_adapters(model, adapters_dir)
    calib = recipe.quantize.calib_sequences if recipe.quantize else 0
    _, exported = run_export_plan(
        model,
        tok,
        plan,
        calib_batches=lambda: [seqs[i : i + 1] for i in range(min(calib, seqs.shape[0]))],
        log=log,
    )
    summary = {
        "recipe": path,
        "steps": cfg.steps,
        "train_seconds": round(elapsed, 1),
        "tokens": cfg.steps * cfg.grad_accum * cfg.batch_size * seqs.shape[1],
        "final": history[-1] if history else None,
        "adapters": str(recipe.output.adapters_path),
        **exported,
    }
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    log(f"[done] {json.dumps(summary)}")
    return summary
