"""Configuration of the ``dms`` mode: the one source of truth for every DMS setting.

``DMSConfig`` is what ``mto.apply_mode(model, [("dms", cfg)])`` validates, what every DMS attention
module keeps (frozen), what a recipe's ``dms:`` section is, and what the versioned ``dms_config``
block of an exported ``config.json`` holds (:meth:`DMSConfig.to_block` / :meth:`DMSConfig.from_block`).
A new setting is a new field here and nothing else.
"""

from __future__ import annotations

from typing import Any, Literal

from modelopt.torch.opt.config import ModeloptBaseConfig, ModeloptField
from pydantic import ConfigDict, StrictFloat, StrictInt, ValidationError, field_validator

__all__ = [
    "DMS_BLOCK_FORMAT_VERSION",
    "DMS_BLOCK_KEY",
    "DMS_DEFAULT_CFG",
    "DMS_SMALL_MODEL_CFG",
    "DMSBlockError",
    "DMSConfig",
]

DMS_BLOCK_KEY = "dms_config"  # key of the DMS block in an exported config.json
DMS_BLOCK_FORMAT_VERSION = 1
# Keys of the block that describe the export rather than configure DMS.
_BLOCK_DESCRIPTIVE = {
    "format_version": None,
    "method": "dms",
    "decision_rule": "key t-1 is evicted iff logit_t > 0, once window_size newer tokens exist",
}
_ADAPTER_PARAMS = "model.layers.N.self_attn.dms_adapter.{norm_weight,proj.weight}"


class DMSBlockError(ValueError):
    """A ``dms_config`` block (config.json, ONNX metadata) that this release cannot read."""


class DMSConfig(ModeloptBaseConfig):
    """Settings of Dynamic Memory Sparsification (docs/design.md §2).

    Unknown keys are rejected; every invalid value (also ``true`` for a number) raises a pydantic
    ``ValidationError`` that names the field and the allowed range. Instances are frozen.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    window_size: StrictInt = ModeloptField(
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
    temperature: StrictFloat | StrictInt = ModeloptField(
        default=0.1, gt=0.0, le=100.0, title="Relaxation temperature tau (training only)"
    )
    logit_scale: StrictFloat | StrictInt = ModeloptField(
        default=100.0, gt=0.0, le=1e6, title="Decision logit scale"
    )
    logit_offset: StrictFloat | StrictInt = ModeloptField(
        default=5.0, ge=-1e6, le=1e6, title="Decision logit offset (subtracted)"
    )
    target_compression_ratio: StrictFloat | StrictInt = ModeloptField(
        default=8.0,
        ge=1.0,
        le=1024.0,
        title="Target compression ratio",
        description="The ratio the trainer anneals towards (train.cr_end defaults to it); recorded "
        "with the adapters and in exports.",
    )
    layers: list[StrictInt] | None = ModeloptField(
        default=None,
        title="Layers to convert",
        description="Indices of decoder layers that get DMS; None converts every layer.",
    )
    noise_seed: StrictInt = ModeloptField(
        default=0, ge=0, le=2**31 - 1, title="Base seed of the training noise"
    )

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

    # ------------------------------------------------------------------ config.json block
    def to_block(self, layers: list[int], fp8_kv: bool = False) -> dict[str, Any]:
        """The versioned ``dms_config`` block of an export.

        Every field, the converted layers (explicit), the KV storage, and a description of the
        decision rule for runtimes.
        """
        fields = self.model_dump()
        fields["layers"] = [int(i) for i in layers]
        return {
            **_BLOCK_DESCRIPTIVE,
            "format_version": DMS_BLOCK_FORMAT_VERSION,
            **fields,
            "adapter_parameters": _ADAPTER_PARAMS if self.decision == "adapter" else None,
            "kv_cache": {"layout": "per_kv_head_compact", "fp8": bool(fp8_kv)},
        }

    @classmethod
    def from_block(cls, block: Any, num_layers: int | None = None, where: str = "config.json") -> DMSConfig:
        """Read a block written by :meth:`to_block`; every problem names the key and the fix.

        ``layers`` listing every one of ``num_layers`` layers becomes ``None`` (all layers).
        """
        hint = "re-export the model with modelopt_dms.export_hf_checkpoint"
        if not isinstance(block, dict):
            raise DMSBlockError(
                f"{where}: '{DMS_BLOCK_KEY}' must be a mapping, got {type(block).__name__}; {hint}."
            )
        version = block.get("format_version")
        if type(version) is not int or version != DMS_BLOCK_FORMAT_VERSION:
            raise DMSBlockError(
                f"{where}: '{DMS_BLOCK_KEY}' has format version {version!r}; this modelopt-dms reads "
                f"version {DMS_BLOCK_FORMAT_VERSION} (an integer). Load it with the release that wrote "
                f"it, or {hint}."
            )
        if block.get("method") != "dms":
            raise DMSBlockError(f"{where}: '{DMS_BLOCK_KEY}.method' is {block.get('method')!r}, not 'dms'.")
        fields = {k: v for k, v in block.items() if k not in (*_BLOCK_DESCRIPTIVE, "adapter_parameters")}
        kv = fields.pop("kv_cache", None)
        if not isinstance(kv, dict) or not isinstance(kv.get("fp8"), bool):
            raise DMSBlockError(f"{where}: '{DMS_BLOCK_KEY}.kv_cache' is missing or malformed; {hint}.")
        missing = sorted(set(cls.model_fields) - set(fields))
        if missing:
            raise DMSBlockError(
                f"{where}: '{DMS_BLOCK_KEY}' lacks the key(s) {missing}; the block was edited or written "
                f"by another tool; {hint}."
            )
        layers = fields.get("layers")
        if num_layers is not None and isinstance(layers, list) and layers == list(range(num_layers)):
            fields["layers"] = None
        try:
            return cls(**fields)
        except ValidationError as err:
            problems = "; ".join(
                f"{DMS_BLOCK_KEY}.{'.'.join(str(p) for p in e['loc'])}: "
                + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                for e in err.errors()
            )
            raise DMSBlockError(f"{where}: invalid DMS block ({problems}); {hint}.") from None

    def describe(self) -> str:
        """One line for logs: the settings that change what the model computes."""
        return (
            f"decision={self.decision} granularity={self.granularity} window={self.window_size} "
            f"scale={self.logit_scale:g} offset={self.logit_offset:g} "
            f"target_cr={self.target_compression_ratio:g}"
        )


# Presets (like mtq.FP8_DEFAULT_CFG): plain dicts for mto.apply_mode / apply_dms.
DMS_DEFAULT_CFG: dict[str, Any] = {"window_size": 256, "decision": "adapter", "granularity": "head"}
# Small models with short contexts (the SmolLM2-135M retrofits): a 64-token window.
DMS_SMALL_MODEL_CFG: dict[str, Any] = {"window_size": 64, "decision": "adapter", "granularity": "head"}
