"""Distillation trainer for DMS decision heads (DESIGN.md §2, "Distillation").

The teacher is the same model under :func:`modelopt_dms.eviction_disabled` (no second copy of the
weights). Loss = KL(teacher ‖ student) per token + ``compression_weight`` × one-sided compression
loss against the linearly annealed target ratio. Checkpoints are atomic and hold everything
needed to resume the same loss curve (DMS state, optimizer, step, RNG).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..control import eviction_disabled, eviction_rate, set_step
from .losses import compression_loss, distillation_kl, target_compression_ratio, target_eviction_rate

__all__ = ["TrainConfig", "TrainingDivergedError", "shard_model", "train", "unshard_for_saving"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Training schedule and optimiser settings."""

    steps: int = 200
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    batch_size: int = 1
    cr_start: float = 1.0
    cr_end: float = 8.0
    anneal_steps: int = 150
    compression_weight: float = 1.0
    kl_direction: str = "forward"
    train_all_weights: bool = False
    autocast_bf16: bool = False
    fsdp: bool = False
    log_every: int = 1
    checkpoint_every: int = 50
    seed: int = 0


def _trainable(model: nn.Module, all_weights: bool) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(all_weights or "dms_adapter" in name)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(
            "No trainable DMS parameters: the borrowed_neuron decision has no adapter; set "
            "train.train_all_weights: true to train it."
        )
    return params


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP (``fully_shard``, FSDP2) every decoder layer and the root over the initialised group.

    Parameters (frozen base weights and DMS adapters alike) are split across ranks and gathered
    one layer at a time, so a model that does not fit one device trains; parameter names are
    unchanged, so checkpoints and adapters are the same files as without FSDP.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "train.fsdp needs torch.distributed: launch with torchrun (gloo on CPU, nccl on GPU)"
        )
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"FSDP: {type(model).__name__} has no model.layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unshard_for_saving(model: nn.Module) -> None:
    """Gather full parameters on every rank (collective) so the adapters can be saved."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable tensors; collective under FSDP (every rank calls)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[n] = t.clone().contiguous()
    return out


def _optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with full tensors; under FSDP keyed by parameter name (collective)."""
    if not _is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    out_dir: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, history: list
) -> str:
    """Atomically write ``out_dir/checkpoint`` (trainable tensors, optimizer, step, log, RNG)."""
    final = os.path.join(out_dir, "checkpoint")
    trainable, opt_state = _trainable_state(model), _optimizer_state(model, opt)  # collective
    if _world()[1] != 0:  # FSDP ranks > 0 only take part in the gathers above
        return final
    tmp = tempfile.mkdtemp(prefix=".checkpoint-", dir=out_dir)
    try:
        save_file(trainable, os.path.join(tmp, "trainable.safetensors"))
        opt_tensors, opt_meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
        for pid, st in opt_state["state"].items():
            opt_meta["state"][str(pid)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    opt_tensors[f"{pid}.{k}"] = v.contiguous()
                    opt_meta["state"][str(pid)][k] = "tensor"
                else:
                    opt_meta["state"][str(pid)][k] = v
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "optimizer": opt_meta, "history": history}, f)
        old = final + ".old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)  # a stale .old only exists next to a good final
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    """The complete checkpoint folder to resume from, or None.

    ``checkpoint`` normally; ``checkpoint.old`` when a kill landed between the two renames of
    :func:`save_checkpoint` (the new one was not in place yet, the previous one still is).
    """
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def load_checkpoint(out_dir: str, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    """Restore what :func:`save_checkpoint` wrote; returns ``(step, history)``."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise FileNotFoundError(f"No complete checkpoint in {out_dir}")
    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(path, "trainable.safetensors"))
    params = dict(model.named_parameters())
    sharded = _is_sharded(model)
    with torch.no_grad():
        for name, value in tensors.items():
            p = params[name]
            if hasattr(p, "device_mesh"):  # FSDP: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)
    opt_tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state = {}
    for pid, entries in meta["optimizer"]["state"].items():
        key = pid if sharded else int(pid)
        state[key] = {k: (opt_tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in entries.items()}
    full = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(full)
    torch.set_rng_state(load_file(os.path.join(path, "rng.safetensors"))["torch_cpu"])
    return int(meta["step"]), list(meta["history"])


def _world() -> tuple[int, int]:
    """(world size, rank) of an initialised torch.distributed group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce_mean(params: list[nn.Parameter], totals: dict[str, float]) -> None:
    """Data parallelism: average gradients and logged metrics over all ranks (what DDP does)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
    metrics = torch.tensor([totals[k] for k in sorted(totals)], dtype=torch.float64)
    dist.all_reduce(metrics, op=dist.ReduceOp.SUM)
    for k, v in zip(sorted(totals), (metrics / world).tolist(), strict=True):
        totals[k] = v


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
    sharding = {}
    if config.fsdp and not _is_sharded(model):
        _trainable(model, config.train_all_weights)  # requires_grad is set before sharding
        total = sum(p.numel() for p in model.parameters())
        shard_model(model)
        local = sum(p.to_local().numel() for p in model.parameters())
        sharding = {"params_total": total, "params_local_rank0": local}
    params = _trainable(model, config.train_all_weights)
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    start, history = 0, []
    for stale in os.listdir(out_dir):  # temp folders of saves that were killed midway
        if stale.startswith(".checkpoint-"):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    if resume and latest_checkpoint(out_dir) is not None:
        start, history = load_checkpoint(out_dir, model, opt)
    log_path = os.path.join(out_dir, "train_log.jsonl")
    with open(log_path, "w") as f:  # rewrite: the log always matches the checkpointed history
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    n_seq = sequences.shape[0]
    world, rank = _world()
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
            first = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
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
                raise TrainingDivergedError(
                    f"Non-finite loss at step {step} (kl={kl.item()}, compression={comp.item()}); the "
                    f"last good checkpoint in {out_dir}/checkpoint is kept. Lower train.lr."
                )
            (loss / config.grad_accum).backward()
            totals["loss"] += loss.item() / config.grad_accum
            totals["kl"] += kl.item() / config.grad_accum
            totals["compression"] += comp.item() / config.grad_accum
            totals["eviction_rate"] += rates.mean().item() / config.grad_accum
        if world > 1:
            _all_reduce_mean([] if config.fsdp else params, totals)  # FSDP reduce-scatters grads itself
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = world * config.grad_accum * config.batch_size * sequences.shape[1]
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
    if config.fsdp:
        unshard_for_saving(model)  # full adapters on every rank for save_adapters / export
    if main_rank:
        with open(os.path.join(out_dir, "train_config.json"), "w") as f:
            json.dump({**asdict(config), "world_size": world, **sharding}, f, indent=2)
    return history
