"""The math of DMS: decision heads, masks, masked attention and the divergences it is judged by."""

from .attention import ADAPTER_ATTR, DMSAttention, DMSAttentionRegistry, DMSSwitches
from .decisions import DMSDecisionAdapter, logistic_noise, relaxed_decisions
from .divergence import kl_per_token, mean_kl

__all__ = [
    "ADAPTER_ATTR",
    "DMSAttention",
    "DMSAttentionRegistry",
    "DMSDecisionAdapter",
    "DMSSwitches",
    "kl_per_token",
    "logistic_noise",
    "mean_kl",
    "relaxed_decisions",
]
