"""The distillation teacher of a model that trains in place: its original behaviour, one switch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..model_dms import eviction_disabled
from ..nn.lora import lora_disabled

__all__ = ["teacher_mode"]


@contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the original: no eviction and no LoRA deltas; both restored on exit."""
    with eviction_disabled(model), lora_disabled(model):
        yield model
