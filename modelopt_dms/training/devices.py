"""Where training runs: the device of this process and the process group of a torchrun launch."""

from __future__ import annotations

import os

import torch

__all__ = ["close_process_group", "init_process_group", "resolve_device"]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> the device of this process.

    Under torchrun (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``, and the
    current CUDA device is set to it (NCCL and every ``.cuda()`` use the current device).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"model.device: {spec} was asked for but no CUDA device is available; use cpu")
        device = torch.device(f"cuda:{local_rank}") if spec == "cuda" else torch.device(spec)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_process_group(device: torch.device) -> tuple[int, int]:
    """Under torchrun: initialise the process group (NCCL on CUDA, gloo on CPU); ``(world, rank)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, int(os.environ.get("RANK", "0"))


def close_process_group() -> None:
    """End a torchrun launch cleanly: wait for every rank, then destroy the process group.

    Call it once nothing holds sharded tensors any more (an FSDP model's DTensors keep the group's
    mesh alive); a group left to interpreter shutdown can abort a rank after its work is done.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # cycles that still hold DTensors (and through them the mesh)
        dist.barrier()
        dist.destroy_process_group()
