"""Distillation trainer for DMS decision heads (docs/design.md §2, "Distillation").

The teacher is the same model under :func:`modelopt_dms.eviction_disabled` (no second copy of the
weights). Loss = KL(teacher ‖ student) per token + ``compression_weight`` × one-sided compression
loss against the linearly annealed target ratio. Checkpoints are atomic and hold everything
needed to resume the same loss curve (DMS state, optimizer, step, RNG).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fileio import TEMP_MARK, atomic_write_json
from ..model_dms import dms_config, dms_modules, eviction_disabled, eviction_rate, set_step
from ..nn.attention import ADAPTER_ATTR
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import all_reduce_mean, is_sharded, shard_model, unshard_for_saving, world
from .losses import compression_loss, distillation_kl, target_compression_ratio, target_eviction_rate

__all__ = ["TrainingDivergedError", "train"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _trainable(model: nn.Module, all_weights: bool) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(all_weights or ADAPTER_ATTR in name.split("."))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(
            "No trainable DMS parameters: the borrowed_neuron decision has no adapter; set "
            "train.train_all_weights: true to train it."
        )
    return params


def train(
    model: nn.Module,
    sequences: torch.Tensor,
    config: TrainConfig,
    out_dir: str,
    resume: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Train the DMS decision heads of ``model`` on ``sequences`` (``(N, T)`` token ids).

    Micro-batch ``i`` of step ``s`` is rows ``[(s * accum + i) * bs, ...)`` (wrapping), so a resumed
    run sees exactly the data an uninterrupted one would. Returns the per-step history, also
    appended to ``out_dir/train_log.jsonl``.
    """
    os.makedirs(out_dir, exist_ok=True)
    config = config.with_target(dms_config(model).target_compression_ratio)
    sharding = {}
    if config.fsdp and not is_sharded(model):
        _trainable(model, config.train_all_weights)  # requires_grad is set before sharding
        total = sum(p.numel() for p in model.parameters())
        shard_model(model)
        local = sum(p.to_local().numel() for p in model.parameters())
        sharding = {"params_total": total, "params_local_rank0": local}
    params = _trainable(model, config.train_all_weights)
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    start, history = 0, []
    for stale in os.listdir(out_dir):  # temp folders of checkpoint saves that were killed midway
        if stale.startswith(f".checkpoint{TEMP_MARK}"):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    if resume and latest_checkpoint(out_dir) is not None:
        start, history = load_checkpoint(out_dir, model, opt)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    with open(log_path, "w") as f:  # rewrite: the log always matches the checkpointed history
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    n_seq = sequences.shape[0]
    world_size, rank = world()
    main_rank = rank == 0
    bar = tqdm(
        range(start, config.steps), initial=start, total=config.steps, disable=not (progress and main_rank)
    )
    model.train()
    for step in bar:
        t0 = time.time()
        set_step(model, step)
        f_target = target_eviction_rate(step, config.cr_start, config.cr_end, config.anneal_steps)
        totals = {"loss": 0.0, "kl": 0.0, "compression": 0.0, "eviction_rate": 0.0}
        for micro in range(config.grad_accum):
            # global micro-batch index: 1 process x 2A accumulation == 2 processes x A
            first = ((step * config.grad_accum + micro) * world_size + rank) * config.batch_size
            rows = [(first + i) % n_seq for i in range(config.batch_size)]
            ids = sequences[rows]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
                with torch.no_grad(), eviction_disabled(model):
                    teacher = model(input_ids=ids, use_cache=False).logits
                student = model(input_ids=ids, use_cache=False).logits
                rates = eviction_rate(model)
                kl = distillation_kl(student, teacher, direction=config.kl_direction)
                comp = compression_loss(rates, f_target)
                loss = kl + config.compression_weight * comp
            if not torch.isfinite(loss):
                last = latest_checkpoint(out_dir)
                kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
                raise TrainingDivergedError(
                    f"Non-finite loss at step {step} (kl={kl.item()}, compression={comp.item()}); {kept}. "
                    "Lower train.lr."
                )
            (loss / config.grad_accum).backward()
            totals["loss"] += loss.item() / config.grad_accum
            totals["kl"] += kl.item() / config.grad_accum
            totals["compression"] += comp.item() / config.grad_accum
            totals["eviction_rate"] += rates.mean().item() / config.grad_accum
        if world_size > 1:
            all_reduce_mean([] if config.fsdp else params, totals)  # FSDP reduce-scatters grads itself
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = world_size * config.grad_accum * config.batch_size * sequences.shape[1]
        rec = {
            "step": step + 1,
            **{k: round(v, 6) for k, v in totals.items()},
            "target_cr": round(
                target_compression_ratio(step, config.cr_start, config.cr_end, config.anneal_steps), 4
            ),
            "target_eviction_rate": round(f_target, 6),
            "grad_norm": float(grad_norm),
            "tokens_per_s": round(tokens / max(time.time() - t0, 1e-9), 1),
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
    model.eval()
    for m in dms_modules(model):  # the last step's decisions hold its autograd graph
        m.dms_switches.last_decisions = None
    if config.fsdp:
        unshard_for_saving(model)  # full adapters on every rank for save_adapters / export
    if main_rank:
        atomic_write_json(
            os.path.join(out_dir, "train_config.json"),
            {**config.model_dump(mode="json"), "world_size": world_size, **sharding},
        )
    return history
