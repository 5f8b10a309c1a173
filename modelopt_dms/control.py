"""Run-time controls of a DMS model: teacher mode, noise step, recorded decisions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attention import DMSAttention

__all__ = [
    "collect_decisions",
    "dms_modules",
    "eviction_disabled",
    "eviction_rate",
    "fixed_eviction",
    "set_step",
]


def dms_modules(model: nn.Module) -> list[DMSAttention]:
    """The DMS attention modules of ``model`` in layer order."""
    mods = [m for m in model.modules() if isinstance(m, DMSAttention)]
    return sorted(mods, key=lambda m: int(m.layer_idx))


def _require(model: nn.Module) -> list[DMSAttention]:
    mods = dms_modules(model)
    if not mods:
        raise ValueError("The model has no DMS attention; apply the 'dms' mode first.")
    return mods


@contextmanager
def _runtime_override(model: nn.Module, name: str, value: object) -> Iterator[None]:
    """Set one run-time switch on every DMS module of ``model``; restore the old values on exit."""
    mods = _require(model)
    previous = [getattr(m._dms, name) for m in mods]
    for m in mods:
        setattr(m._dms, name, value)
    try:
        yield
    finally:
        for m, prev in zip(mods, previous, strict=True):
            setattr(m._dms, name, prev)


@contextmanager
def eviction_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without eviction (its own distillation teacher); restores the flags on exit."""
    with _runtime_override(model, "eviction_disabled", True):
        yield model


@contextmanager
def fixed_eviction(model: nn.Module, keep_every: int) -> Iterator[nn.Module]:
    """Override learned decisions with a fixed pattern: keep key ``k`` iff ``k % keep_every == 0``.

    Positions are the logical token indices (``cache_position``), so the eviction rate is known
    exactly: ``1 - 1/keep_every`` of the tokens outside the window. For benchmarks and tests.
    """
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    with _runtime_override(model, "keep_every", keep_every):
        yield model


def set_step(model: nn.Module, step: int) -> None:
    """Set the training step that seeds the logistic noise (deterministic per step and layer)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    for m in _require(model):
        m._dms.step = int(step)


def collect_decisions(model: nn.Module) -> dict[int, torch.Tensor]:
    """Hard decisions ``(B, Hkv, T)`` of the last forward per layer index.

    In training mode they carry the straight-through gradient the compression loss needs.
    """
    out = {}
    for m in _require(model):
        if m._dms.last_decisions is not None:
            out[int(m.layer_idx)] = m._dms.last_decisions
    return out


def eviction_rate(model: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence mean hard eviction rate of the last forward, ``(B,)``.

    Args:
        valid: optional ``(B, T)`` mask of real (non-padding) positions to average over.

    """
    decisions = collect_decisions(model)
    if not decisions:
        raise ValueError("No decisions recorded: run a forward pass of the DMS model first.")
    stacked = torch.stack(list(decisions.values()), dim=1)  # (B, L, H, T)
    if valid is None:
        return stacked.mean(dim=(1, 2, 3))
    w = valid.to(stacked.dtype)[:, None, None, :]
    count = w.sum(dim=(1, 2, 3)) * stacked.shape[1] * stacked.shape[2]
    return (stacked * w).sum(dim=(1, 2, 3)) / count.clamp_min(1)
