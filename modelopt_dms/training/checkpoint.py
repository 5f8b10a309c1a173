"""Training checkpoints: trainable tensors, optimizer, step, log and RNG, written atomically.

A checkpoint is the folder ``<run>/checkpoint`` (safetensors + JSON, no pickle). It is staged in a
temp folder and swapped in; a kill between the two renames leaves ``checkpoint.old`` complete.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import normalise_permissions, staging_dir
from .distributed import is_sharded, world

__all__ = ["CHECKPOINT_NAMES", "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAMES = ("checkpoint", "checkpoint.old")


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed; the message names the file and the fix."""


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
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    out_dir: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, history: list
) -> str:
    """Atomically write ``out_dir/checkpoint``: trainable tensors, optimizer, step, log, CPU/CUDA RNG."""
    final = os.path.join(out_dir, "checkpoint")
    trainable, opt_state = _trainable_state(model), _optimizer_state(model, opt)  # collective
    if world()[1] != 0:  # FSDP ranks > 0 only take part in the gathers above
        return final
    tmp = str(staging_dir(final))
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
        device = next(model.parameters()).device
        if device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(device)
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "optimizer": opt_meta, "history": history}, f)
        normalise_permissions(tmp)
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
    for name in CHECKPOINT_NAMES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def _read(
    path: str,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every file of a checkpoint, or :class:`CheckpointError` naming the damaged one."""
    hint = "rerun with --restart (recipe: train.resume: false) to start the run over"
    name = "state.json"
    try:
        with open(os.path.join(path, name)) as f:
            meta = json.load(f)
        step, history, opt_meta = int(meta["step"]), list(meta["history"]), meta["optimizer"]
        name = "trainable.safetensors"
        tensors = load_file(os.path.join(path, name))
        name = "optimizer.safetensors"
        opt_tensors = load_file(os.path.join(path, name))
        name = "rng.safetensors"
        rng = load_file(os.path.join(path, name))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"The checkpoint in {path} is damaged ({name}: {err}); {hint}.") from None
    return {"step": step, "history": history, "optimizer": opt_meta}, tensors, opt_tensors, rng


def load_checkpoint(out_dir: str, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    """Restore what :func:`save_checkpoint` wrote; returns ``(step, history)``.

    Raises:
        CheckpointError: a damaged checkpoint, or one of another model (names or shapes differ).

    """
    path = latest_checkpoint(out_dir)
    if path is None:
        raise FileNotFoundError(f"No complete checkpoint in {out_dir}")
    meta, tensors, opt_tensors, rng = _read(path)
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        p = params.get(name)
        if p is None or tuple(value.shape) != tuple(getattr(p, "shape", ())):
            raise CheckpointError(
                f"The checkpoint in {path} does not fit this model ({name}: "
                f"{'no such parameter' if p is None else f'{tuple(value.shape)} vs {tuple(p.shape)}'}); "
                "rerun with --restart to start over."
            )
    sharded = is_sharded(model)
    with torch.no_grad():
        for name, value in tensors.items():
            p = params[name]
            if hasattr(p, "device_mesh"):  # FSDP: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)
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
    torch.set_rng_state(rng["torch_cpu"])
    device = next(model.parameters()).device
    if "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
    return meta["step"], meta["history"]
