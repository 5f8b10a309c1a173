"""Framework glue, applied on import.

transformers (attention classes, residual hook, generate default, ``from_pretrained``) and Model
Optimizer quantization (k/v bmm quantizers).
"""

from . import huggingface, quantization

__all__ = ["huggingface", "quantization"]
