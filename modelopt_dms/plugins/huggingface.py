"""Hugging Face transformers glue: which attention classes DMS converts, and the three patches.

* the Llama / Mistral / Qwen2 / Qwen3 attention classes are registered with
  :data:`~modelopt_dms.nn.attention.DMSAttentionRegistry`;
* a decoder-layer forward pre-hook hands the layer's residual input (before ``input_layernorm``)
  to the adapter decision head;
* ``model.generate`` on a DMS model uses a :class:`~modelopt_dms.cache.DMSCache` by default;
* ``PreTrainedModel.post_init`` applies the ``dms`` mode when a config carries a ``dms_config``
  block (an export), so ``from_pretrained`` rebuilds DMS before the weights load.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from ..cache import DMSCache
from ..config import DMS_BLOCK_KEY, DMSBlockError, DMSConfig
from ..nn.attention import ADAPTER_ATTR, DMSAttention, DMSAttentionRegistry

__all__ = [
    "SUPPORTED_ATTENTION_CLASSES",
    "add_residual_hook",
    "install_dms_generation",
    "install_from_pretrained_hook",
    "quiet_loading",
    "uninstall_dms_generation",
]

SUPPORTED_ATTENTION_CLASSES: dict[type[nn.Module], str] = {
    LlamaAttention: "LlamaAttention",
    MistralAttention: "MistralAttention",
    Qwen2Attention: "Qwen2Attention",
    Qwen3Attention: "Qwen3Attention",
}
DMSAttentionRegistry.register(SUPPORTED_ATTENTION_CLASSES)(DMSAttention)


# ---------------------------------------------------------------------------------------- residual hook
def _stash_residual(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Decoder-layer pre-hook: hand the residual input (before input_layernorm) to DMS."""
    attn = layer.self_attn
    if isinstance(attn, DMSAttention):
        attn.dms_switches.residual = args[0] if args else kwargs.get("hidden_states")


def add_residual_hook(decoder_layer: nn.Module) -> Any:
    """Register the residual pre-hook on a decoder layer; returns the removable handle."""
    return decoder_layer.register_forward_pre_hook(_stash_residual, with_kwargs=True)


# ---------------------------------------------------------------------------------------- generate
_PREPARE_CACHE = "_prepare_cache_for_generation"


def _prepare_cache_with_dms(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
    impl = generation_config.cache_implementation
    if impl not in (None, "dynamic"):
        raise ValueError(
            f"generate(cache_implementation={impl!r}) is not supported on a DMS model: DMS decodes "
            "with its compact DMSCache (the default: drop cache_implementation) or, for the masked "
            "reference, a DynamicCache (cache_implementation='dynamic')."
        )
    no_cache = model_kwargs.get("past_key_values") is None
    if no_cache and generation_config.use_cache is not False and impl is None:
        model_kwargs["past_key_values"] = DMSCache()
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


def install_dms_generation(model: nn.Module) -> None:
    """Patch ``model`` (a ``GenerationMixin``) so a generate call without a cache gets a DMSCache."""
    if hasattr(type(model), _PREPARE_CACHE):
        setattr(model, _PREPARE_CACHE, types.MethodType(_prepare_cache_with_dms, model))


def uninstall_dms_generation(model: nn.Module) -> None:
    """Undo :func:`install_dms_generation`."""
    model.__dict__.pop(_PREPARE_CACHE, None)


# ---------------------------------------------------------------------------------------- from_pretrained
def install_from_pretrained_hook() -> None:
    """Make ``from_pretrained`` / ``from_config`` rebuild DMS from a config's ``dms_config`` block.

    After a causal LM's ``post_init`` the ``dms`` mode is applied (before weights load), so the
    exported adapter weights load into place. Installed once, on ``import modelopt_dms``.
    """
    from transformers import PreTrainedModel

    if getattr(PreTrainedModel.post_init, "_dms_hook", False):
        return
    original_post_init = PreTrainedModel.post_init
    original_from_pretrained = PreTrainedModel.from_pretrained.__func__

    def post_init(self, *args, **kwargs):
        out = original_post_init(self, *args, **kwargs)
        block = getattr(self.config, DMS_BLOCK_KEY, None)
        if block is not None and hasattr(self, "lm_head"):
            _apply_from_block(self, block)
        return out

    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = original_from_pretrained(cls, *args, output_loading_info=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        _check_dms_tensors_loaded(model, info, source)
        return (model, info) if want_info else model

    post_init._dms_hook = True  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _check_dms_tensors_loaded(model: nn.Module, info: dict, source: Any) -> None:
    """Refuse a DMS model whose checkpoint lacks (or has extra) decision-adapter tensors."""
    if not any(isinstance(m, DMSAttention) for m in model.modules()):
        return

    def dms_keys(keys: Any) -> list[str]:
        return sorted(k for k in (keys or []) if ADAPTER_ATTR in str(k).split("."))

    missing, unexpected = dms_keys(info.get("missing_keys")), dms_keys(info.get("unexpected_keys"))
    if missing:
        raise DMSBlockError(
            f"{source}: the checkpoint lacks the DMS adapter tensor(s) {missing[:3]} (and {len(missing) - 1} "
            "more at most) that its DMS config needs; the model would compute with uninitialised "
            "decision heads. Re-export it with modelopt_dms.export_hf_checkpoint."
        )
    if unexpected:
        raise DMSBlockError(
            f"{source}: the checkpoint holds DMS adapter tensor(s) {unexpected[:3]} that its DMS config "
            "does not use (was the dms_config block edited?). Re-export it with "
            "modelopt_dms.export_hf_checkpoint."
        )


def _apply_from_block(model: nn.Module, block: Any) -> None:
    import modelopt.torch.opt as mto

    if any(isinstance(m, DMSAttention) for m in model.modules()):
        return
    quant = getattr(model.config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = {"quant_method": getattr(quant, "quant_method", None)}
    quant_method = quant.get("quant_method")
    if quant_method is not None and str(quant_method).lower() == "modelopt":
        raise DMSBlockError(
            f"{getattr(model.config, '_name_or_path', 'this checkpoint')} is a modelopt-quantized (FP8) DMS "
            "export: transformers cannot dequantize its weights and would return a model that computes "
            "garbage. Load it with modelopt_dms.load_exported(path)."
        )
    num_layers = getattr(model.config, "num_hidden_layers", None)
    config = DMSConfig.from_block(block, num_layers)
    mto.apply_mode(model, [("dms", config.model_dump())])
    # The block has done its job: the modelopt state now carries DMS (a later save_pretrained
    # with HF checkpointing must not apply it twice).
    delattr(model.config, DMS_BLOCK_KEY)


# ---------------------------------------------------------------------------------------- quiet loading
@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-tensor progress bars or info chatter from transformers while a model loads.

    Covers the "Loading weights" bars, the GGUF de-quantisation bar (a bare ``tqdm`` in
    ``modeling_gguf_pytorch_utils``) and info logs; everything is restored afterwards. The caller
    prints one line per load.
    """
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, level, gguf_tqdm = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


install_from_pretrained_hook()
