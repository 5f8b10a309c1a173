"""modelopt-dms: Dynamic Memory Sparsification as a Model Optimizer mode.

``import modelopt_dms`` registers the ``dms`` mode (and its plugins) with Model Optimizer.
"""

from .attention import DMSAttention
from .config import DMSConfig
from .control import collect_decisions, dms_modules, eviction_disabled, eviction_rate, set_step
from .conversion import apply_dms
from .mode import DMS_FORMAT_VERSION, DMSModeDescriptor, is_dms_model

__version__ = "0.1.0"

__all__ = [
    "DMS_FORMAT_VERSION",
    "DMSAttention",
    "DMSConfig",
    "DMSModeDescriptor",
    "apply_dms",
    "collect_decisions",
    "dms_modules",
    "eviction_disabled",
    "eviction_rate",
    "is_dms_model",
    "set_step",
]
