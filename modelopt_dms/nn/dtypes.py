"""Dtype casts that cost nothing when there is nothing to cast (decode steps are dispatch-bound)."""

from __future__ import annotations

import torch

__all__ = ["as_dtype"]


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, without dispatching an op when ``x`` already has it (the decode step)."""
    return x if x.dtype == dtype else x.to(dtype)
