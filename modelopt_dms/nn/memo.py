"""One-slot memo keyed on a tensor: what the layers of a forward would each recompute from one mask."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["LastForTensor"]


class LastForTensor:
    """The value last made for a tensor, reused while the same tensor comes back unchanged.

    A hit needs the same tensor object (held weakly: a new tensor at a reused address never hits),
    the same version (an in-place edit misses) and the same ``extra`` key. Only the last value is
    kept, in this object rather than on the tensor: a value that views the tensor would otherwise
    form a cycle through C++ that the garbage collector never frees.
    """

    def __init__(self) -> None:
        self._slot: tuple[Hashable, weakref.ref, Any] | None = None

    def get(self, tensor: torch.Tensor, extra: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` for ``(tensor, extra)``, or the value made for them last time."""
        key = (id(tensor), tensor._version, extra)
        slot = self._slot
        if slot is not None and slot[0] == key and slot[1]() is tensor:
            return slot[2]
        value = make()
        self._slot = (key, weakref.ref(tensor), value)
        return value
