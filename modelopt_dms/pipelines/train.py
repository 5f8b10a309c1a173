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
from ..fileio import atomic_write_json
from ..loading import load_model
from ..model_dms import apply_dms
from ..training.chat_data import mix_chat_sequences
from ..training.recipe import TrainRecipe, load_train_recipe
from ..training.trainer import train
from .export import ExportPlan, run_export_plan

__all__ = ["export_plan_of", "run_recipe"]


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


def run_recipe(path: str, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a training recipe end to end; returns (and writes to ``<dir>/summary.json``) a summary."""
    recipe = load_train_recipe(path)
    _, rank = _init_distributed()
    out_dir = recipe.output.dir
    os.makedirs(out_dir, exist_ok=True)
    log(f"[recipe] {path} -> {out_dir}")
    model, tok = load_model(recipe.model.name_or_path, dtype=getattr(torch, recipe.model.dtype))
    model = apply_dms(model, recipe.dms)
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
    adapters_dir = recipe.output.adapters_path
    save_adapters(model, adapters_dir)
    calib = recipe.quantize.calib_sequences if recipe.quantize else 0
    _, exported = run_export_plan(
        model,
        tok,
        export_plan_of(recipe),
        calib_batches=lambda: [seqs[i : i + 1] for i in range(min(calib, seqs.shape[0]))],
        log=log,
    )
    summary = {
        "recipe": path,
        "steps": cfg.steps,
        "train_seconds": round(elapsed, 1),
        "tokens": cfg.steps * cfg.grad_accum * cfg.batch_size * seqs.shape[1],
        "final": history[-1] if history else None,
        "adapters": str(adapters_dir),
        **exported,
    }
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    log(f"[done] {json.dumps(summary)}")
    return summary
