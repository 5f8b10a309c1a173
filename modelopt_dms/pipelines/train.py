"""``modelopt-dms run RECIPE``: load, apply DMS, tokenise real text, train, save adapters, export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..corpus import build_documents, build_mixture_documents, build_mixture_sequences, build_token_sequences
from ..export.adapters import check_adapters, save_adapters
from ..export.hf_checkpoint import check_export_target
from ..export.onnx import check_onnx_target
from ..fileio import atomic_write_json
from ..loading import load_model
from ..model_dms import apply_dms
from ..nn.lora import merge_lora
from ..outputs import OutputError, ensure_writable_parent, user_path
from ..schema import RecipeError
from ..training.chat_data import mix_chat_sequences
from ..training.devices import close_process_group, init_process_group, resolve_device
from ..training.packing import PackedRows, pack_documents
from ..training.recipe import TrainRecipe, load_train_recipe
from ..training.run_folder import RunFolder, run_fingerprint
from ..training.teacher_cache import TeacherCache, teacher_cache_folder
from ..training.trainer import train, training_seconds
from .export import ExportPlan, check_export_space, run_export_plan

__all__ = ["data_rows", "export_plan_of", "preflight", "run_recipe"]


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


def _fingerprint(recipe: TrainRecipe, world_size: int) -> dict[str, Any]:
    sections = {
        "model": recipe.model.model_dump(mode="json"),
        "dms": recipe.dms.model_dump(mode="json"),
        "data": recipe.data.model_dump(mode="json"),
        "train": recipe.schedule.model_dump(mode="json"),
    }
    return run_fingerprint(sections, world_size)


def _fingerprint_defaults() -> dict[str, Any]:
    """The fingerprint of an all-defaults recipe: what a setting added later meant before."""
    defaults = TrainRecipe()
    sections = {
        name: getattr(defaults, name).model_dump(mode="json") for name in ("model", "dms", "data", "train")
    }
    return run_fingerprint(sections, 1)


def preflight(recipe: TrainRecipe, resuming: bool = False) -> None:
    """Every destination check that needs no model: before loading, tokenising or training.

    ``resuming``: the run goes on from its own checkpoint, which holds where it got to, so the
    ``train.init_adapters`` artifact it started from is not read (and may be gone).
    """
    out_dir = user_path(recipe.output.dir)
    ensure_writable_parent(out_dir / "x", "output.dir")
    adapters = user_path(recipe.output.adapters_path)
    if adapters.exists() and not adapters.is_dir():
        raise OutputError(f"output.adapters_dir {adapters} exists and is not a folder; choose another one.")
    ensure_writable_parent(adapters, "output.adapters_dir")
    if recipe.schedule.init_adapters and not resuming:  # readable before any model is loaded
        check_adapters(recipe.schedule.init_adapters)
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
    device = resolve_device(recipe.model.device)
    caller_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size, rank = init_process_group(device)
    # model.device says where to run, not what is computed: it is not part of the fingerprint
    out_dir = user_path(recipe.output.dir)
    cfg = recipe.schedule
    folder = RunFolder(
        out_dir,
        _fingerprint(recipe, world_size),
        cfg.steps,
        restart or not cfg.resume,
        _fingerprint_defaults(),
    )
    preflight(recipe, folder.resumes)
    if rank == 0:
        folder.open()
    try:
        summary = _train_in(recipe, path, str(out_dir), rank, device, progress, log)
    finally:
        folder.close()
    if world_size > 1 and not caller_group:  # a group the caller made is the caller's to close
        close_process_group()  # the model is gone with _train_in's frame
    return summary


def data_rows(
    data, tok, seq_len: int, split: str, max_sequences: int | None
) -> tuple[torch.Tensor, dict[str, int] | None]:
    """``(rows, rows per source or None)`` of ``seq_len`` tokens from a recipe's ``data`` text.

    The recipe's one source (``text_glob``) or its mixture (``sources``), split into train and
    held-out files as ``data`` says.
    """
    if data.sources:
        return build_mixture_sequences(
            tok, data.sources, seq_len, split, data.heldout_fraction, data.seed, max_sequences, data.cache_dir
        )
    rows = build_token_sequences(
        tok, data.text_glob, seq_len, split, data.heldout_fraction, data.seed, max_sequences, data.cache_dir
    )
    return rows, None


def _training_rows(recipe: TrainRecipe, tok, log) -> torch.Tensor | PackedRows:
    """The recipe's training rows: one document per row, or whole documents packed."""
    d = recipe.data
    mix = ""
    if d.packing:
        if d.sources:
            docs, taken = build_mixture_documents(
                tok, d.sources, "train", d.heldout_fraction, d.seed, d.cache_dir
            )
            mix = ", tokens " + ", ".join(f"{k} {n}" for k, n in taken.items())
        else:
            docs = build_documents(tok, d.text_glob, "train", d.heldout_fraction, d.seed, d.cache_dir)
        rows = pack_documents(docs, d.seq_len, pad_id=tok.pad_token_id or 0)
        if d.max_sequences is not None:
            rows = rows[: d.max_sequences]
        n_docs = int((rows.doc_ids.max(-1).values + 1).sum())
        log(f"[data] {rows.shape[0]} packed rows of {rows.shape[1]} tokens ({n_docs} documents{mix})")
        return rows
    seqs, counts = data_rows(d, tok, d.seq_len, "train", d.max_sequences)
    if counts is not None:
        mix = "; rows " + ", ".join(f"{k} {n}" for k, n in counts.items())
    seqs = mix_chat_sequences(
        tok, seqs, d.chat_fraction, d.recall_fraction, seed=d.seed, multi_turn_fraction=d.multi_turn_fraction
    )
    multi = f", multi-turn recall {d.multi_turn_fraction:.0%}" if d.multi_turn_fraction else ""
    log(
        f"[data] {seqs.shape[0]} training sequences of {seqs.shape[1]} tokens "
        f"(chat {d.chat_fraction:.0%}, recall {d.recall_fraction:.0%}{multi}{mix})"
    )
    return seqs


def _train_in(
    recipe: TrainRecipe, path: str, out_dir: str, rank: int, device: torch.device, progress: bool, log
) -> dict[str, Any]:
    log(f"[recipe] {path} -> {out_dir} ({device})")
    model, tok = load_model(recipe.model.name_or_path, dtype=getattr(torch, recipe.model.dtype))
    model = model.to(device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and recipe.data.seq_len > max_pos:
        raise RecipeError(
            f"data.seq_len = {recipe.data.seq_len} exceeds the model's max_position_embeddings ({max_pos}); "
            "lower data.seq_len."
        )
    model = apply_dms(model, recipe.dms)
    plan = export_plan_of(recipe)
    check_export_space(model, plan)  # before training, not after
    seqs = _training_rows(recipe, tok, log)
    cfg = recipe.schedule
    cache = None
    if cfg.teacher_cache:
        rows = seqs.input_ids if isinstance(seqs, PackedRows) else seqs
        key = f"{recipe.model.name_or_path}|{recipe.model.dtype}|{type(model).__name__}"
        folder = teacher_cache_folder(Path(recipe.data.cache_dir) / "teacher", key, rows, cfg.teacher_topk)
        cache = TeacherCache(folder, cfg.teacher_topk)
        log(f"[teacher] top-{cfg.teacher_topk} teacher cache in {folder}")
    history = train(model, seqs, cfg, out_dir, progress=progress, teacher_cache=cache)
    if rank != 0:
        return {"rank": rank}
    if not cfg.train_all_weights:  # all weights trained: only the exported model is the trained one
        save_adapters(model, user_path(recipe.output.adapters_path))  # with the LoRA deltas, if any
    merge_lora(model)  # exports hold the merged weights (no-op without LoRA)
    calib = recipe.quantize.calib_sequences if recipe.quantize else 0
    ids = seqs.input_ids if isinstance(seqs, PackedRows) else seqs
    _, exported = run_export_plan(
        model,
        tok,
        plan,
        calib_batches=lambda: [ids[i : i + 1] for i in range(min(calib, ids.shape[0]))],
        log=log,
    )
    tokens_per_step = cfg.grad_accum * cfg.batch_size * seqs.shape[1]
    summary = {
        "recipe": path,
        "steps": cfg.steps,
        "train_seconds": round(training_seconds(history, tokens_per_step), 3),  # every session's steps
        "tokens": cfg.steps * tokens_per_step,
        "final": history[-1] if history else None,
        "adapters": None if cfg.train_all_weights else str(recipe.output.adapters_path),
        **exported,
    }
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    log(f"[done] {json.dumps(summary)}")
    return summary
