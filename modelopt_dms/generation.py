"""Make ``model.generate`` use a :class:`~modelopt_dms.cache.DMSCache` by default."""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from .cache import DMSCache

__all__ = ["install_dms_generation", "uninstall_dms_generation"]

_ATTR = "_prepare_cache_for_generation"


def _prepare_cache_with_dms(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
    if (
        model_kwargs.get("past_key_values") is None
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
    ):
        model_kwargs["past_key_values"] = DMSCache()
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


def install_dms_generation(model: nn.Module) -> None:
    """Patch ``model`` (a ``GenerationMixin``) so a generate call without a cache gets a DMSCache."""
    if hasattr(type(model), _ATTR):
        setattr(model, _ATTR, types.MethodType(_prepare_cache_with_dms, model))


def uninstall_dms_generation(model: nn.Module) -> None:
    """Undo :func:`install_dms_generation`."""
    model.__dict__.pop(_ATTR, None)
