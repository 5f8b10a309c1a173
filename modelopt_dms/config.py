"""Configuration of the ``dms`` mode."""

from __future__ import annotations

from typing import Literal

from modelopt.torch.opt.config import ModeloptBaseConfig, ModeloptField
from pydantic import field_validator

__all__ = ["DMSConfig"]


class DMSConfig(ModeloptBaseConfig):
    """Settings of Dynamic Memory Sparsification (DESIGN.md §2).

    Unknown keys are rejected; every invalid value raises a pydantic ``ValidationError`` that
    names the field and the allowed range.
    """

    window_size: int = ModeloptField(
        default=256,
        ge=1,
        le=1 << 20,
        title="Delayed-eviction window w",
        description="A key flagged for eviction stays visible to itself and w later tokens.",
    )
    decision: Literal["adapter", "borrowed_neuron"] = ModeloptField(
        default="adapter",
        title="Decision kind",
        description="'adapter': new RMSNorm+Linear per layer (zero-init, exact identity at start); "
        "'borrowed_neuron': last channel of the first query head of each group.",
    )
    granularity: Literal["head", "layer"] = ModeloptField(
        default="head",
        title="Decision granularity",
        description="'head': one decision per KV head; 'layer': head 0's decision for all heads.",
    )
    temperature: float = ModeloptField(
        default=0.1, gt=0.0, le=100.0, title="Relaxation temperature tau (training only)"
    )
    logit_scale: float = ModeloptField(default=100.0, gt=0.0, le=1e6, title="Decision logit scale")
    logit_offset: float = ModeloptField(
        default=5.0, ge=-1e6, le=1e6, title="Decision logit offset (subtracted)"
    )
    target_compression_ratio: float = ModeloptField(
        default=8.0,
        ge=1.0,
        le=1024.0,
        title="Target compression ratio",
        description="Documentation and training target; the trainer anneals towards it.",
    )
    layers: list[int] | None = ModeloptField(
        default=None,
        title="Layers to convert",
        description="Indices of decoder layers that get DMS; None converts every layer.",
    )
    noise_seed: int = ModeloptField(default=0, ge=0, le=2**31 - 1, title="Base seed of the training noise")

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if len(value) == 0:
            raise ValueError("layers must name at least one layer index, or be None for all")
        if any(i < 0 for i in value):
            raise ValueError(f"layers must be non-negative indices, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"layers has duplicates: {value}")
        return sorted(value)
