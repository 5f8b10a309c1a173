"""Distributed training helpers: the process group view, FSDP2 sharding and gradient averaging."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["all_reduce_mean", "is_sharded", "shard_model", "unshard_for_saving", "world"]


def world() -> tuple[int, int]:
    """``(world size, rank)`` of an initialised torch.distributed group, else ``(1, 0)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` is wrapped by FSDP2 (``fully_shard``)."""
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


def all_reduce_mean(params: list[nn.Parameter], totals: dict[str, float]) -> None:
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
