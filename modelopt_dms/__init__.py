"""modelopt-dms: Dynamic Memory Sparsification as a Model Optimizer mode.

``import modelopt_dms`` registers the ``dms`` mode with Model Optimizer and installs the plugins
(transformers attention classes, ``from_pretrained`` / ``generate`` hooks, FP8 quantization glue).
"""

from . import mode, plugins  # noqa: F401  (registration happens on import)
from ._version import __version__
from .cache import DMSCache, GraphDecoder, cache_stats
from .config import DMS_DEFAULT_CFG, DMS_SMALL_MODEL_CFG, DMSConfig
from .conversion import DMS_FORMAT_VERSION, is_dms_model  # noqa: F401
from .export import (
    OnnxDMSGenerator,
    export_hf_checkpoint,
    export_onnx,
    load_adapters,
    load_exported,
    save_adapters,
)
from .loading import load_model
from .mode import DMSModeDescriptor  # noqa: F401
from .model_dms import (  # noqa: F401
    apply_dms,
    collect_decisions,
    dms_config,
    dms_modules,
    eviction_disabled,
    eviction_rate,
    fixed_eviction,
    fp8_config,
    print_dms_summary,
    quantize_fp8,
    set_decision_offset,
    set_step,
)

# Importable for advanced use, but internals, not part of __all__:
from .nn.attention import DMSAttention  # noqa: F401
from .plugins.huggingface import install_from_pretrained_hook  # noqa: F401
from .plugins.quantization import register_dms_for_quantization  # noqa: F401

__all__ = [
    "DMS_DEFAULT_CFG",
    "DMS_SMALL_MODEL_CFG",
    "DMSCache",
    "DMSConfig",
    "GraphDecoder",
    "OnnxDMSGenerator",
    "__version__",
    "apply_dms",
    "cache_stats",
    "collect_decisions",
    "dms_config",
    "eviction_disabled",
    "eviction_rate",
    "export_hf_checkpoint",
    "export_onnx",
    "fixed_eviction",
    "fp8_config",
    "is_dms_model",
    "load_adapters",
    "load_exported",
    "load_model",
    "print_dms_summary",
    "quantize_fp8",
    "save_adapters",
    "set_decision_offset",
    "set_step",
]
