"""Deployable checkpoints: the unified Hugging Face export with a versioned DMS block.

``export_hf_checkpoint`` writes safetensors + ``config.json`` (with a ``dms_config`` block) +
tokenizer files, and for FP8-quantized models Model Optimizer's unified format
(``hf_quant_config.json``, FP8 weights with scales, ``k_scale``/``v_scale``).

Loading back:

* unquantized: ``import modelopt_dms`` then plain ``AutoModelForCausalLM.from_pretrained(dir)``
  rebuilds the DMS model from the config block (no ``trust_remote_code``; the hook lives in
  :mod:`modelopt_dms.plugins.huggingface`);
* FP8: :func:`load_exported` rebuilds the quantized DMS model from the checkpoint alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DMS_BLOCK_KEY, DMSConfig
from ..fileio import atomic_write_json, normalise_permissions, publish_dir, staging_dir
from ..model_dms import dms_config, dms_modules, fp8_config
from ..nn.lora import require_merged
from ..outputs import (
    FolderLock,
    check_free_space,
    check_replaceable,
    clean_leftovers,
    ensure_writable_parent,
    user_path,
    write_marker,
)

__all__ = [
    "HF_EXPORT_KIND",
    "check_export_target",
    "dms_config_block",
    "export_hf_checkpoint",
    "load_exported",
]


def dms_config_block(model: nn.Module) -> dict[str, Any]:
    """Everything a runtime needs to run DMS: the model's DMSConfig as a versioned block."""
    mods = dms_modules(model)
    if not mods:
        raise ValueError("export needs a DMS model: apply the 'dms' mode (dms.apply_dms) first.")
    fp8_kv = mods[0]._dms_kv_storage_scales() is not None
    return dms_config(model).to_block([int(m.layer_idx) for m in mods], fp8_kv=fp8_kv)


def _is_quantized(model: nn.Module) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return any(isinstance(m, TensorQuantizer) and m.is_enabled for m in model.modules())


HF_EXPORT_KIND = "hf_checkpoint"


def check_export_target(export_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise unless ``export_dir`` can receive an export (cheap: call it before any heavy work).

    Allowed: a new path, an empty folder, or (with ``overwrite``) a previous modelopt-dms export that
    holds only the files the export wrote. A user's folder or file is never replaced.
    """
    export_dir = user_path(export_dir)
    check_replaceable(export_dir, HF_EXPORT_KIND, overwrite, "Export target")
    ensure_writable_parent(export_dir, "Export target")
    return export_dir


def _lock_for(export_dir: Path) -> FolderLock:
    return FolderLock(export_dir.with_name(f".{export_dir.name}.lock"), f"export target {export_dir}")


def export_hf_checkpoint(
    model: nn.Module,
    export_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a DMS model (optionally FP8-quantized) as a deployable Hugging Face checkpoint.

    The model itself is not modified (the exporter works on a copy). The folder appears only when
    complete (it is written next to the target and renamed into place); a failed or killed export
    leaves the previous state, and the next export into the same place removes its leftovers.
    ``overwrite`` replaces only a previous modelopt-dms export (see :func:`check_export_target`).
    """
    require_merged(model, "export_hf_checkpoint")
    block = dms_config_block(model)
    export_dir = check_export_target(export_dir, overwrite)
    with _lock_for(export_dir):
        clean_leftovers(export_dir)
        check_export_target(export_dir, overwrite)  # again, now that no other export can interfere
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        check_free_space(export_dir.parent, int(param_bytes * 1.1) + (1 << 20), "Export target")
        tmp = staging_dir(export_dir)
        try:
            _write_export(model, tmp, block, tokenizer, dtype)
            write_marker(tmp, HF_EXPORT_KIND)
            normalise_permissions(tmp)
            publish_dir(tmp, export_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return export_dir


def _write_export(
    model: nn.Module, folder: Path, block: dict, tokenizer: Any, dtype: torch.dtype | None
) -> None:
    work = copy.deepcopy(model)
    work.config.architectures = [type(work).__name__]
    if _is_quantized(work):
        from modelopt.torch.export import export_hf_checkpoint as mo_export

        mo_export(work, dtype=dtype or next(work.parameters()).dtype, export_dir=folder)
    else:
        kwargs = {"save_modelopt_state": False} if hasattr(type(work), "_modelopt_cache") else {}
        if dtype is not None:
            work.to(dtype)
        work.save_pretrained(folder, **kwargs)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[DMS_BLOCK_KEY] = block
    cfg["architectures"] = [type(model).__name__]
    atomic_write_json(cfg_path, cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------- loading


def load_exported(export_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Rebuild a DMS model (FP8 or not) from an export folder alone; returns ``(model, tokenizer)``.

    For FP8 exports the FP8 weights are dequantized with their scales and Model Optimizer's FP8
    quantizers are re-created with the exported amax values (weights, inputs, k/v), so the model
    computes exactly what the quantized model computed, and the DMS cache stores FP8 KV.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    export_dir = user_path(export_dir)
    cfg_path = export_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{export_dir} has no config.json: not an export folder.")
    raw = json.loads(cfg_path.read_text())
    block = raw.get(DMS_BLOCK_KEY)
    if not block:
        raise ValueError(f"{cfg_path} has no '{DMS_BLOCK_KEY}' block: not a modelopt-dms export.")
    DMSConfig.from_block(block, where=str(cfg_path))  # validate before anything heavy
    quant_path = export_dir / "hf_quant_config.json"
    tokenizer = None
    if any(export_dir.glob("tokenizer*")):
        tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    if not quant_path.is_file():
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype, local_files_only=True)
        return model.eval(), tokenizer

    quant = json.loads(quant_path.read_text())["quantization"]
    weights_fp8 = quant.get("quant_algo") == "FP8"
    kv_fp8 = quant.get("kv_cache_quant_algo") == "FP8"
    if quant.get("quant_algo") not in (None, "FP8") or quant.get("kv_cache_quant_algo") not in (None, "FP8"):
        raise ValueError(
            f"Unsupported quantization {quant.get('quant_algo')!r} / KV "
            f"{quant.get('kv_cache_quant_algo')!r}: load_exported reads FP8 weight and/or FP8 KV exports."
        )
    if not (weights_fp8 or kv_fp8):
        raise ValueError(f"{quant_path} names no FP8 quantization; nothing to rebuild.")
    raw.pop("quantization_config", None)
    config = AutoConfig.for_model(
        **{k: v for k, v in raw.items() if k != "model_type"}, model_type=raw["model_type"]
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # DMS applied from the block
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(export_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    _load_fp8_state(model, tensors, weights_fp8, kv_fp8, dtype)
    return model.eval(), tokenizer


def _load_fp8_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], weights_fp8: bool, kv_fp8: bool, dtype: torch.dtype
) -> None:
    import modelopt.torch.quantization as mtq

    mtq.quantize(model, fp8_config(weights=weights_fp8, kv_cache=kv_fp8), forward_loop=None)
    state, amax = {}, {}
    for name, value in tensors.items():
        if name.endswith(".weight_scale") or name.endswith(".input_scale"):
            continue
        if name.endswith(".k_proj.k_scale") or name.endswith(".v_proj.v_scale"):
            attn = name.rsplit(".", 2)[0]
            which = "k" if name.endswith("k_scale") else "v"
            amax[f"{attn}.{which}_bmm_quantizer"] = value.float() * 448.0
            continue
        if value.dtype == torch.float8_e4m3fn:
            base = name[: -len(".weight")]
            value = value.to(torch.float32) * tensors[f"{base}.weight_scale"].float()
            amax[f"{base}.weight_quantizer"] = tensors[f"{base}.weight_scale"].float() * 448.0
            if f"{base}.input_scale" in tensors:
                amax[f"{base}.input_quantizer"] = tensors[f"{base}.input_scale"].float() * 448.0
        state[name] = value.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "_quantizer" not in k and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"FP8 export does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    modules = dict(model.named_modules())
    for qname, value in amax.items():
        if qname not in modules:
            raise ValueError(f"FP8 export names a quantizer {qname} that the model does not have.")
        modules[qname].amax = value
