"""Producers of artifacts.

The adapters-only artifact, the unified HF checkpoint, the ONNX step graph and its ONNX Runtime
driver (serving-side scripts live in the repository's ``deploy/``).
"""

from .adapters import load_adapters, save_adapters
from .hf_checkpoint import dms_config_block, export_hf_checkpoint, load_exported
from .onnx import export_onnx
from .onnx_runtime import OnnxDMSGenerator

__all__ = [
    "OnnxDMSGenerator",
    "dms_config_block",
    "export_hf_checkpoint",
    "export_onnx",
    "load_adapters",
    "load_exported",
    "save_adapters",
]
