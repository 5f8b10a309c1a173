"""Model Optimizer quantization glue: DMS attention classes get k/v bmm quantizers.

``mtq.quantize`` only gives KV quantizers to attention classes whose forward it recognises, so a
DMS attention would silently get none. This plugin registers every DMS attention class with
Model Optimizer's quantization registry through ``CUSTOM_MODEL_PLUGINS``: the quantized class
owns ``k_bmm_quantizer`` / ``v_bmm_quantizer`` and applies them where DMS hands keys and values
to attention and to the cache. The decision adapters are kept out of quantization (their logit is
scaled by 100, so rounding would flip eviction decisions): they are not ``nn.Linear``.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
from modelopt.torch.quantization.plugins.custom import CUSTOM_MODEL_PLUGINS
from torch import nn

from ..nn.attention import DMSAttention

__all__ = ["FP8_E4M3_MAX", "QuantDMSAttention", "kv_fp8_scales", "register_dms_for_quantization"]

FP8_E4M3_MAX = 448.0


class QuantDMSAttention(QuantModule):
    """DMS attention with ``k_bmm_quantizer`` and ``v_bmm_quantizer`` (disabled until configured)."""

    def _setup(self) -> None:
        self.k_bmm_quantizer = TensorQuantizer()
        self.v_bmm_quantizer = TensorQuantizer()

    def _dms_kv_storage_scales(self) -> tuple[float, float] | None:
        return kv_fp8_scales(self)

    def _dms_quantize_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_bmm_quantizer(key), self.v_bmm_quantizer(value)


def register_dms_for_quantization(model: nn.Module) -> None:
    """``CUSTOM_MODEL_PLUGINS`` callback: register each DMS attention class found in ``model``."""
    for module in model.modules():
        cls = type(module)
        if isinstance(module, DMSAttention) and cls not in QuantModuleRegistry:
            QuantModuleRegistry.register({cls: cls.__name__})(QuantDMSAttention)


def kv_fp8_scales(module: nn.Module) -> tuple[float, float] | None:
    """Per-tensor FP8 scales ``amax / 448`` of a calibrated, enabled FP8 k/v quantizer pair, else None."""
    kq = getattr(module, "k_bmm_quantizer", None)
    vq = getattr(module, "v_bmm_quantizer", None)
    if kq is None or vq is None:
        return None
    scales = []
    for q in (kq, vq):
        amax = getattr(q, "amax", None)
        if not q.is_enabled or amax is None or q.num_bits != (4, 3) or amax.numel() != 1:
            return None
        scales.append(float(amax) / FP8_E4M3_MAX)
    return scales[0], scales[1]


CUSTOM_MODEL_PLUGINS.add(register_dms_for_quantization)
