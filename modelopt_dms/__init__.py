"""modelopt-dms: Dynamic Memory Sparsification as a Model Optimizer mode.

``import modelopt_dms`` registers the ``dms`` mode (and its plugins) with Model Optimizer.
"""

from .adapters_io import load_adapters, save_adapters
from .attention import DMSAttention
from .cache import DMSCache, cache_stats
from .config import DMSConfig
from .control import (
    collect_decisions,
    dms_modules,
    eviction_disabled,
    eviction_rate,
    fixed_eviction,
    set_step,
)
from .conversion import apply_dms
from .hf_export import export_hf_checkpoint, install_from_pretrained_hook, load_exported
from .loading import load_model
from .mode import DMS_FORMAT_VERSION, DMSModeDescriptor, is_dms_model
from .onnx_export import export_onnx
from .onnx_runtime import OnnxDMSGenerator
from .quantization import fp8_config, quantize_fp8, register_dms_for_quantization

install_from_pretrained_hook()

__version__ = "0.1.0"

__all__ = [
    "DMS_FORMAT_VERSION",
    "DMSAttention",
    "DMSCache",
    "DMSConfig",
    "DMSModeDescriptor",
    "OnnxDMSGenerator",
    "apply_dms",
    "cache_stats",
    "collect_decisions",
    "dms_modules",
    "eviction_disabled",
    "eviction_rate",
    "export_hf_checkpoint",
    "export_onnx",
    "fixed_eviction",
    "fp8_config",
    "is_dms_model",
    "register_dms_for_quantization",
    "load_adapters",
    "load_exported",
    "load_model",
    "quantize_fp8",
    "save_adapters",
    "set_step",
]
