"""``mtq``-style entry point: ``apply_dms(model, config)``."""

from __future__ import annotations

from typing import Any

import modelopt.torch.opt as mto
from torch import nn

from .config import DMSConfig

__all__ = ["apply_dms"]


def apply_dms(model: nn.Module, config: DMSConfig | dict[str, Any] | None = None) -> nn.Module:
    """Apply the ``dms`` mode; same as ``mto.apply_mode(model, [("dms", config)])``."""
    if config is None:
        config = {}
    if isinstance(config, DMSConfig):
        config = config.model_dump()
    return mto.apply_mode(model, [("dms", config)])
