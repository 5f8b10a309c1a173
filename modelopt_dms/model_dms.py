"""The verbs users call on a model: apply DMS, switch it at run time, read it, quantize it.

Like ``mtq.quantize`` / ``mtq.print_quant_summary`` for quantization: :func:`apply_dms`,
:func:`dms_config`, :func:`print_dms_summary`, the run-time switches (:func:`eviction_disabled`,
:func:`fixed_eviction`, :func:`set_step`), the decisions of the last forward
(:func:`collect_decisions`, :func:`eviction_rate`), the decision threshold
(:func:`set_decision_offset`) and FP8 post-training quantization (:func:`quantize_fp8`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import modelopt.torch.opt as mto
import torch
from torch import nn

from .config import DMSConfig
from .conversion import is_dms_model
from .nn.attention import ADAPTER_ATTR, DMSAttention
from .nn.lora import require_merged

__all__ = [
    "apply_dms",
    "collect_decisions",
    "dms_config",
    "dms_modules",
    "eviction_disabled",
    "eviction_rate",
    "fixed_eviction",
    "fp8_config",
    "is_dms_model",
    "print_dms_summary",
    "quantize_fp8",
    "set_decision_offset",
    "set_step",
]


def apply_dms(model: nn.Module, config: DMSConfig | dict[str, Any] | None = None) -> nn.Module:
    """Apply the ``dms`` mode; same as ``mto.apply_mode(model, [("dms", config)])``."""
    if config is None:
        config = {}
    if isinstance(config, DMSConfig):
        config = config.model_dump()
    return mto.apply_mode(model, [("dms", config)])


def dms_modules(model: nn.Module) -> list[DMSAttention]:
    """The DMS attention modules of ``model`` in layer order."""
    mods = [m for m in model.modules() if isinstance(m, DMSAttention)]
    return sorted(mods, key=lambda m: int(m.layer_idx))


def _require(model: nn.Module) -> list[DMSAttention]:
    mods = dms_modules(model)
    if not mods:
        raise ValueError("The model has no DMS attention; apply the 'dms' mode first.")
    return mods


def dms_config(model: nn.Module) -> DMSConfig:
    """The (frozen) :class:`DMSConfig` the ``dms`` mode was applied with."""
    return _require(model)[0].dms_config


def print_dms_summary(model: nn.Module) -> str:
    """Print (and return) one line per DMS layer: decision head, window, KV storage, switches."""
    mods = _require(model)
    cfg = mods[0].dms_config
    lines = [f"DMS: {len(mods)} layer(s); {cfg.describe()}"]
    for m in mods:
        adapter = m._modules.get(ADAPTER_ATTR)
        params = sum(p.numel() for p in adapter.parameters()) if adapter is not None else 0
        kv = "fp8" if m._dms_kv_storage_scales() is not None else "compute dtype"
        sw = m.dms_switches
        state = (
            "eviction disabled"
            if sw.eviction_disabled
            else (f"fixed keep 1/{sw.keep_every}" if sw.keep_every else "learned decisions")
        )
        lines.append(
            f"  layer {int(m.layer_idx):3d} {type(m).__name__}: {m.num_kv_heads} KV heads, "
            f"{cfg.decision} ({params} params), KV storage {kv}, {state}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def dms_mode_state(model: nn.Module) -> dict[str, Any] | None:
    """The live ``dms`` entry (``{"config": ..., "metadata": ...}``) of the model's modelopt state.

    None when ``model`` is not the top-level model the mode was applied to (or has no DMS).
    """
    if not mto.ModeloptStateManager.is_converted(model):
        return None
    states = [s for name, s in mto.ModeloptStateManager(model).state_dict() if name == "dms"]
    return states[-1] if states else None


def set_decision_offset(model: nn.Module, offset: float) -> DMSConfig:
    """Set the decision threshold of a trained DMS model: its config's ``logit_offset``.

    A key is evicted where ``logit_scale * raw - logit_offset > 0``, so a larger offset evicts fewer
    tokens (lower compression, closer to the uncompressed model). The new value is part of the
    config, so every saved form carries it: the ``dms`` mode state (``mto.save`` / restore),
    :func:`~modelopt_dms.save_adapters`, the HF export and traced ONNX graphs. ``model`` is the
    top-level model the mode was applied to. Returns the new config.
    """
    mods = _require(model)
    state = dms_mode_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has DMS layers but no 'dms' mode state: pass the top-level model "
            "that modelopt_dms.apply_dms (or mto.apply_mode) was called on."
        )
    config = DMSConfig(**{**mods[0].dms_config.model_dump(), "logit_offset": float(offset)})
    for m in mods:
        m.dms_config = config
    state["config"] = config.model_dump()
    return config


@contextmanager
def _runtime_override(model: nn.Module, name: str, value: object) -> Iterator[None]:
    """Set one run-time switch on every DMS module of ``model``; restore the old values on exit."""
    mods = _require(model)
    previous = [getattr(m.dms_switches, name) for m in mods]
    for m in mods:
        setattr(m.dms_switches, name, value)
    try:
        yield
    finally:
        for m, prev in zip(mods, previous, strict=True):
            setattr(m.dms_switches, name, prev)


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


def set_step(model: nn.Module, step: int, rows: torch.Tensor | None = None) -> None:
    """Set the training step (and the global ids of the batch rows) that seed the logistic noise.

    The noise of an element is a function of (noise seed, step, layer, row id, head, position):
    deterministic, and independent of how rows are spread over ranks and accumulation steps.
    ``rows`` defaults to ``0..B-1``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    for m in _require(model):
        m.dms_switches.step = int(step)
        m.dms_switches.rows = rows


def collect_decisions(model: nn.Module) -> dict[int, torch.Tensor]:
    """Hard decisions ``(B, Hkv, T)`` of the last forward per layer index.

    Float 0/1; in training mode they carry the straight-through gradient the compression loss needs.
    """
    out = {}
    for m in _require(model):
        d = m.dms_switches.last_decisions
        if d is not None:
            out[int(m.layer_idx)] = d if d.is_floating_point() else d.float()
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


def fp8_config(weights: bool = True, kv_cache: bool = True) -> dict:
    """An ``mtq`` config: FP8 (E4M3, per-tensor) weights+inputs and/or FP8 k/v bmm quantizers."""
    import modelopt.torch.quantization as mtq

    if not (weights or kv_cache):
        raise ValueError("fp8_config needs weights=True and/or kv_cache=True")
    if weights:
        cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    else:
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    if kv_cache:
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def quantize_fp8(
    model: nn.Module, calib_batches: list[torch.Tensor], weights: bool = True, kv_cache: bool = True
) -> nn.Module:
    """``mtq.quantize`` a DMS model to FP8 and calibrate on ``calib_batches`` (token id tensors)."""
    import modelopt.torch.quantization as mtq

    if not calib_batches:
        raise ValueError("quantize_fp8 needs at least one calibration batch of token ids")
    require_merged(model, "quantize_fp8")

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for ids in calib_batches:
                m(input_ids=ids.to(next(m.parameters()).device), use_cache=False)

    was_training = model.training
    model.eval()
    model = mtq.quantize(model, fp8_config(weights, kv_cache), forward_loop)
    model.train(was_training)
    return model
