"""Distillation trainer for DMS decision heads (docs/design.md §2, "Distillation").

The teacher is the same model under :func:`~modelopt_dms.training.teacher.teacher_mode` (no
eviction, no LoRA deltas: no second copy of the weights) while only the DMS adapters train (and,
with ``lora_rank``, low-rank deltas of the attention projections); with
``train_all_weights`` it is a frozen copy of the model as passed in (the original weights), so the
target does not drift with the student.
Loss = KL(teacher ‖ student) per token + ``compression_weight`` × one-sided compression loss
against the linearly annealed target ratio. Checkpoints are atomic and hold everything needed
to resume the same loss curve (DMS state, optimizer, step, RNG).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..export.adapters import init_trainable_from, save_adapters
from ..fileio import TEMP_MARK, atomic_write_json
from ..model_dms import dms_config, dms_modules, eviction_rate, set_step
from ..nn.attention import ADAPTER_ATTR
from ..nn.lora import LORA_ATTR, attach_lora, has_lora
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import all_reduce_mean, is_sharded, shard_model, unshard_for_saving, world
from .fused_kl import fused_head_kl, topk_kl
from .losses import compression_loss, distillation_kl, target_compression_ratio, target_eviction_rate
from .packing import PackedRows, row_inputs
from .selection import drop_snapshots_after, snapshot_path
from .teacher import teacher_mode

__all__ = ["TrainingDivergedError", "train", "training_seconds"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _trainable(model: nn.Module, all_weights: bool) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        p.requires_grad_(all_weights or ADAPTER_ATTR in parts or LORA_ATTR in parts)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(
            "No trainable DMS parameters: the borrowed_neuron decision has no adapter; set "
            "train.train_all_weights: true to train it."
        )
    return params


def _upcast_trainable(params: list[nn.Parameter]) -> None:
    """Trainable parameters in float32 (a master copy) when the base is bf16/fp16.

    A bf16 step of 1e-3 on a norm weight near 1.0 rounds away (bf16 spacing at 1.0 is 2**-7).
    """
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def _micro_batch(
    sequences: torch.Tensor | PackedRows, first: int, config: TrainConfig, device: torch.device, dtype
) -> dict:
    """Rows ``first .. first + batch - 1`` (wrapping) on ``device``.

    Ids and row ids, and for packed rows the per-document positions and block-diagonal mask.
    """
    n_seq = sequences.shape[0]
    ids = sequences.input_ids if isinstance(sequences, PackedRows) else sequences
    rows = (torch.arange(config.batch_size, device=ids.device) + first) % n_seq  # where the data lives
    batch = sequences[rows]
    if isinstance(batch, PackedRows):
        inputs = row_inputs(batch.doc_ids.to(device), dtype)
        return {
            "input_ids": batch.input_ids.to(device),
            "position_ids": inputs["position_ids"],
            "attention_mask": inputs["attention_mask"],
            "valid": inputs["valid"],
            "rows": rows.to(device),
        }
    return {"input_ids": batch.to(device), "rows": rows.to(device), "valid": None}


class _FinalHidden:
    """Captures the decoder's final hidden states (the output of its last norm: the lm_head input)."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = model.model.norm.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


def _kl_view(batch: dict, window: int, beyond_window: bool) -> tuple[slice, torch.Tensor | None]:
    """Which positions the KL is taken over, as a slice of the sequence and per-position weights.

    With ``kl_beyond_window`` only positions ``> w`` count: at a position ``t <= w`` every key is
    inside the window, so the student computes exactly what the teacher does (KL 0). Unpacked rows
    drop those positions by slicing (no logits are computed for them); packed rows weight them 0.
    """
    valid, positions = batch["valid"], batch.get("position_ids")
    if not beyond_window:
        return slice(None), valid
    if positions is None:
        return slice(window + 1, None), None if valid is None else valid[:, window + 1 :]
    beyond = positions > window
    return slice(None), beyond if valid is None else valid & beyond


def _param_groups(model: nn.Module, params: list[nn.Parameter], config: TrainConfig) -> list[dict]:
    """One optimizer group at ``lr``, and the LoRA deltas (if any) in a second one at ``lora_lr``."""
    lora = {id(p) for n, p in model.named_parameters() if LORA_ATTR in n.split(".")}
    groups = [{"params": [p for p in params if id(p) not in lora], "lr": config.lr}]
    if lora:
        groups.append({"params": [p for p in params if id(p) in lora], "lr": config.lora_lr})
    return groups


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients): the teacher when every weight trains."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


def _losses(
    model,
    batch,
    config: TrainConfig,
    f_target: float,
    hidden: _FinalHidden,
    teacher_cache,
    teacher_model=None,
):
    """Student (and teacher) forward of one micro-batch; returns ``(loss, kl, compression, rate)``.

    ``teacher_model``: a frozen copy to take the teacher from (None: ``model`` itself).
    """
    kw = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    ids = batch["input_ids"]
    keep, weights = _kl_view(batch, dms_config(model).window_size, config.kl_beyond_window)
    # fused: the KL reads hidden states through the student's lm_head, so the teacher must share it
    fused = config.fused_kl and config.kl_direction == "forward" and not config.fsdp and teacher_model is None
    logits_to_keep = 1 if fused else 0  # fused: no full logits are made
    if teacher_cache is not None:
        teacher = teacher_cache.get(model, batch, keep)
    else:
        source = model if teacher_model is None else teacher_model
        with torch.no_grad(), teacher_mode(source):
            t_out = source(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep, **kw)
        teacher = hidden.take()[:, keep] if fused else t_out.logits[:, keep]
    s_out = model(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep, **kw)
    s_hidden = hidden.take()
    if fused:
        kl = fused_head_kl(s_hidden[:, keep], teacher, model.lm_head.weight, weights, chunk=config.kl_chunk)
    elif teacher_cache is not None:
        kl = topk_kl(s_out.logits[:, keep], teacher, weights)
    else:
        kl = distillation_kl(
            s_out.logits[:, keep], teacher, weights, direction=config.kl_direction, chunk_size=config.kl_chunk
        )
    rates = eviction_rate(model, batch["valid"])
    comp = compression_loss(rates, f_target)
    return kl + config.compression_weight * comp, kl, comp, rates.mean()


def training_seconds(history: list[dict], tokens_per_step: int) -> float:
    """Wall time of the steps in ``history`` (every session of a resumed run), from their records.

    Records written before steps carried ``seconds`` fall back to ``tokens_per_step / tokens_per_s``.
    """
    return sum(
        r["seconds"] if "seconds" in r else tokens_per_step / r["tokens_per_s"]
        for r in history
        if r.get("seconds") or r.get("tokens_per_s")
    )


def train(
    model: nn.Module,
    sequences: torch.Tensor | PackedRows,
    config: TrainConfig,
    out_dir: str,
    resume: bool = True,
    progress: bool = True,
    teacher_cache=None,
) -> list[dict]:
    """Train the DMS decision heads of ``model`` on ``sequences`` (``(N, T)`` ids or packed rows).

    Everything runs on the model's device. Micro-batch ``i`` of step ``s`` is rows
    ``[((s * accum + i) * world + rank) * bs, ...)`` (wrapping), and the training noise of a row is
    a function of its row id, so a resumed run, or the same global batch spread over another number
    of ranks and accumulation steps, computes exactly the same. Returns the per-step history, also
    appended to ``out_dir/train_log.jsonl``.

    With ``config.init_adapters`` a run that starts (not one that resumes) takes its DMS parameters and
    LoRA deltas from that artifact (a warm start: :func:`~modelopt_dms.export.adapters.init_trainable_from`).
    With ``config.lora_rank`` the LoRA deltas stay attached when it returns (``save_adapters`` saves
    them); call :func:`modelopt_dms.nn.lora.merge_lora` before ``mto.save`` or an export.
    """
    os.makedirs(out_dir, exist_ok=True)
    config = config.with_target(dms_config(model).target_compression_ratio)
    if teacher_cache is not None and config.train_all_weights:
        raise ValueError(
            "train.teacher_cache needs frozen base weights (the cached teacher would go stale): set "
            "train.train_all_weights: false or train.teacher_cache: false."
        )
    device = next(model.parameters()).device
    compute_dtype = next(model.parameters()).dtype
    # every weight trains: the teacher is the model as it came in (before resuming or sharding)
    teacher_model = frozen_teacher(model) if config.train_all_weights else None
    if config.lora_rank and not has_lora(model):  # before the warm start, the optimizer and a checkpoint load
        attach_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    resuming = resume and latest_checkpoint(out_dir) is not None
    if config.init_adapters and not resuming:  # a resumed run's checkpoint holds where it got to
        init_trainable_from(model, config.init_adapters)
    sharding = {}
    if config.fsdp and not is_sharded(model):
        _upcast_trainable(_trainable(model, config.train_all_weights))  # dtype and requires_grad first
        total = sum(p.numel() for p in model.parameters())
        shard_model(model)
        local = sum(p.to_local().numel() for p in model.parameters())
        sharding = {"params_total": total, "params_local_rank0": local}
    params = _trainable(model, config.train_all_weights)
    _upcast_trainable(params)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kernel = config.attention
    if kernel == "auto":
        kernel = "flex" if device.type == "cuda" else "sdpa"
    if kernel == "flex" and device.type != "cuda":
        raise ValueError("train.attention: flex has no backward on CPU; use eager (or auto) there")
    for m in dms_modules(model):
        m.dms_switches.training_kernel = kernel
    groups = _param_groups(model, params, config)
    opt = torch.optim.AdamW(groups, betas=config.betas, weight_decay=config.weight_decay)
    start, history = 0, []
    for stale in os.listdir(out_dir):  # temp folders of checkpoint saves that were killed midway
        if stale.startswith(f".checkpoint{TEMP_MARK}"):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    if resuming:
        start, history = load_checkpoint(out_dir, model, opt)
    if world()[1] == 0:
        drop_snapshots_after(out_dir, start)  # written past the checkpoint (or by a run started over)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    with open(log_path, "w") as f:  # rewrite: the log always matches the checkpointed history
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    world_size, rank = world()
    main_rank = rank == 0
    bar = tqdm(
        range(start, config.steps), initial=start, total=config.steps, disable=not (progress and main_rank)
    )
    hidden = _FinalHidden(model)
    model.train()
    try:
        for step in bar:
            t0 = time.time()
            f_target = target_eviction_rate(step, config.cr_start, config.cr_end, config.anneal_steps)
            totals = torch.zeros(4, dtype=torch.float32, device=device)  # loss, kl, compression, rate
            for micro in range(config.grad_accum):
                first = ((step * config.grad_accum + micro) * world_size + rank) * config.batch_size
                batch = _micro_batch(sequences, first, config, device, compute_dtype)
                set_step(model, step, rows=batch["rows"])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
                    loss, kl, comp, rate = _losses(
                        model, batch, config, f_target, hidden, teacher_cache, teacher_model
                    )
                (loss / config.grad_accum).backward()
                totals += torch.stack([loss, kl, comp, rate]).detach().float() / config.grad_accum
            if world_size > 1:
                all_reduce_mean([] if config.fsdp else params, totals)  # FSDP reduce-scatters grads itself
            values = totals.tolist()  # the one host read of the step
            if not all(math.isfinite(v) for v in values):
                last = latest_checkpoint(out_dir)
                kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
                raise TrainingDivergedError(
                    f"Non-finite loss at step {step} (kl={values[1]}, compression={values[2]}); {kept}. "
                    "Lower train.lr."
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.time() - t0
            tokens = world_size * config.grad_accum * config.batch_size * sequences.shape[1]
            rec = {
                "step": step + 1,
                **{
                    k: round(v, 6)
                    for k, v in zip(("loss", "kl", "compression", "eviction_rate"), values, strict=True)
                },
                "target_cr": round(
                    target_compression_ratio(step, config.cr_start, config.cr_end, config.anneal_steps), 4
                ),
                "target_eviction_rate": round(f_target, 6),
                "grad_norm": float(grad_norm),
                "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                "seconds": round(elapsed, 3),
            }
            history.append(rec)
            checkpoint_now = config.checkpoint_every and (
                (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            )
            if not main_rank:
                if checkpoint_now and config.fsdp:
                    save_checkpoint(out_dir, model, opt, step + 1, history)  # its collectives only
                continue
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(
                loss=f"{rec['loss']:.4f}",
                kl=f"{rec['kl']:.4f}",
                evict=f"{rec['eviction_rate']:.3f}",
                cr=f"{rec['target_cr']:.2f}",
                tok_s=f"{rec['tokens_per_s']:.0f}",
            )
            if checkpoint_now:
                save_checkpoint(out_dir, model, opt, step + 1, history)
            if config.snapshot_every and (step + 1) % config.snapshot_every == 0:
                save_adapters(model, snapshot_path(out_dir, step + 1))
    finally:
        hidden.handle.remove()
    model.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    for m in dms_modules(model):  # the last step's decisions hold its autograd graph
        m.dms_switches.last_decisions = None
        m.dms_switches.training_kernel = "eager"
    if config.fsdp:
        unshard_for_saving(model)  # full adapters on every rank for save_adapters / export
    if main_rank:
        atomic_write_json(
            os.path.join(out_dir, "train_config.json"),
            {**config.model_dump(mode="json"), "world_size": world_size, **sharding},
        )
    return history
