"""Convert, restore and describe a model for the ``dms`` mode (the entrypoints ``mode.py`` declares)."""

from __future__ import annotations

from typing import Any

from modelopt.torch.opt.conversion import ApplyModeError, ModelLikeModule
from modelopt.torch.opt.dynamic import DynamicModule
from modelopt.torch.opt.mode import ConvertReturnType, MetadataDict
from torch import nn

from .config import DMSConfig
from .nn.attention import ADAPTER_ATTR, DMSAttention, DMSAttentionRegistry
from .plugins.huggingface import (
    SUPPORTED_ATTENTION_CLASSES,
    add_residual_hook,
    install_dms_generation,
    uninstall_dms_generation,
)

__all__ = [
    "DMS_FORMAT_VERSION",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "convert_to_dms",
    "is_dms_model",
    "restore_dms",
    "update_dms_metadata",
]

DMS_FORMAT_VERSION = 1  # of the mode metadata and the adapters artifact
_SUPPORTED_NAMES = ", ".join(sorted(SUPPORTED_ATTENTION_CLASSES.values()))
# attn_implementation values whose masks DMS reads: 4D (eager, sdpa), 2D padding masks (flash
# attention) and flex BlockMasks.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def is_dms_model(model: nn.Module) -> bool:
    """True if any attention layer of ``model`` has been converted by the ``dms`` mode."""
    return any(isinstance(m, DMSAttention) for m in model.modules())


def _find_targets(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """All ``(decoder_layer, attention)`` pairs whose attention class DMS supports."""
    found = []
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if isinstance(attn, nn.Module) and attn in DMSAttentionRegistry:
            found.append((module, attn))
    return found


def _validate(model: nn.Module, config: DMSConfig) -> list[tuple[nn.Module, nn.Module]]:
    if is_dms_model(model):
        raise ApplyModeError(
            "DMS is already applied to this model; apply the 'dms' mode once (use "
            "mto.restore / dms.load_adapters to load trained DMS state instead)."
        )
    wrapped = [
        type(m).__name__
        for m in model.modules()
        if isinstance(m, DynamicModule) and type(m).__name__.endswith("Attention")
    ]
    if wrapped:
        raise ApplyModeError(
            f"Attention layers are already converted by another mode ({wrapped[0]}); apply 'dms' "
            "first, then mtq.quantize or other modes."
        )
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is not None and impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ApplyModeError(
            f"DMS does not support attn_implementation={impl!r}; supported: "
            f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)}. Load the model with attn_implementation='sdpa'."
        )
    targets = _find_targets(model)
    if not targets:
        classes = sorted(
            {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")}
        )
        raise ApplyModeError(
            f"No supported attention layer in {type(model).__name__} (found: {classes or 'none'}). "
            f"DMS supports the Hugging Face attention classes: {_SUPPORTED_NAMES}."
        )
    if config.layers is not None:
        available = sorted(int(attn.layer_idx) for _, attn in targets)
        missing = [i for i in config.layers if i not in available]
        if missing:
            raise ApplyModeError(
                f"DMSConfig.layers names layers {missing} that the model does not have; "
                f"valid indices are {available[0]}..{available[-1]}."
            )
        targets = [(layer, attn) for layer, attn in targets if int(attn.layer_idx) in config.layers]
    return targets


def _rollback(converted: list[tuple[nn.Module, Any]]) -> None:
    for attn, handle in reversed(converted):
        if handle is not None:
            handle.remove()
        attn._modules.pop(ADAPTER_ATTR, None)
        attn.export()


def _metadata(model: nn.Module) -> MetadataDict:
    layers = sorted(int(m.layer_idx) for m in model.modules() if isinstance(m, DMSAttention))
    return {"dms_format_version": DMS_FORMAT_VERSION, "dms_layers": layers}


def convert_to_dms(model: nn.Module, config: DMSConfig, **kwargs: Any) -> ConvertReturnType:
    """Convert every supported attention layer (or ``config.layers``) to DMS attention."""
    model = model.init_modellike() if isinstance(model, ModelLikeModule) else model
    targets = _validate(model, config)
    converted: list[tuple[nn.Module, Any]] = []
    try:
        for layer, attn in targets:
            DMSAttentionRegistry.convert(attn, config=config)
            converted.append((attn, None))
            converted[-1] = (attn, add_residual_hook(layer))
        install_dms_generation(model)
    except Exception as err:
        _rollback(converted)
        uninstall_dms_generation(model)
        raise ApplyModeError(f"DMS conversion failed and was rolled back: {err}") from err
    return model, _metadata(model)


def restore_dms(model: nn.Module, config: DMSConfig, metadata: MetadataDict) -> nn.Module:
    """Re-apply DMS from a saved config; learned values come back with the state dict."""
    version = metadata.get("dms_format_version")
    if version != DMS_FORMAT_VERSION:
        raise ApplyModeError(
            f"This checkpoint was written with DMS format version {version!r}; this modelopt-dms "
            f"reads version {DMS_FORMAT_VERSION}. Re-save it with a matching modelopt-dms release."
        )
    model = model.init_modellike() if isinstance(model, ModelLikeModule) else model
    layers = sorted(int(attn.layer_idx) for _, attn in _validate(model, config))
    if layers != metadata.get("dms_layers"):
        raise ApplyModeError(
            f"Checkpoint has DMS on layers {metadata.get('dms_layers')}, but this model converts "
            f"to {layers}: the checkpoint belongs to a different architecture."
        )
    model, _ = convert_to_dms(model, config)
    return model


def update_dms_metadata(model: nn.Module, config: DMSConfig, metadata: MetadataDict) -> None:
    """Refresh the (architectural) metadata before saving or before the next mode."""
    metadata.update(_metadata(model))
