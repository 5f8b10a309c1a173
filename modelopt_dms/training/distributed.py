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
    device = next(model.parameters()).device.type
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


def all_reduce_mean(params: list[nn.Parameter], totals: torch.Tensor) -> None:
    """Data parallelism: average gradients and metrics over all ranks in one all-reduce.

    The gradients of ``params`` and the metrics ``totals`` go into one flat float32 buffer (on
    the parameters' device: NCCL needs CUDA tensors); the averages are copied back in place.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [totals.reshape(-1).float()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    totals.copy_(flat[offset:].view_as(totals))
