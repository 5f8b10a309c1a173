"""One plain prefill shared by every kvpress press that compresses the same context.

kvpress compresses at prefill in a forward hook that runs after each attention layer has attended
over the whole context. What the hook of layer ``l`` sees (the layer's input hidden states, RoPE,
cache position, attention weights and the layer's uncompressed keys/values) does not depend on the
press: compression changes only what the cache stores, and layer ``l + 1`` reads the full-context
attention output, never layer ``l``'s cache. One forward of the unpressed model therefore records
what every press's hook receives; replaying ``press.forward_hook`` layer by layer on a fresh cache
that holds the recorded keys/values yields the cache (and DMSPress's key masks) a hooked prefill
yields, at the cost of the compression alone. The hooked prefill stays the reference in the tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SharedPrefill", "attention_modules"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's attention layers, where kvpress hooks its presses."""
    return [layer.self_attn for layer in model.model.layers]


class SharedPrefill:
    """Records one prefill of ``model`` and replays kvpress presses on it.

    ``cache_for(press, ids)`` records the prefill of ``ids`` unless it is the one held, then returns
    the cache the press's own hook leaves after a prefill of ``ids``. One record is held at a time
    (the latest context); :meth:`clear` frees it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.prefills = 0  # forwards run (one per distinct context)
        self.clear()

    def clear(self) -> None:
        """Drop the recorded prefill."""
        self._ids: torch.Tensor | None = None
        self._calls: list[tuple[nn.Module, dict[str, Any], tuple]] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _holds(self, ids: torch.Tensor) -> bool:
        return self._ids is not None and self._ids.shape == ids.shape and torch.equal(self._ids, ids)

    def record(self, ids: torch.Tensor) -> None:
        """Run the plain prefill of ``ids`` once, keeping every attention hook's inputs."""
        from transformers import DynamicCache

        if self._holds(ids):
            return
        self.clear()
        calls: list[tuple[nn.Module, dict[str, Any], tuple]] = []

        def keep(module, args, kwargs, output):
            inputs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
            calls.append((module, inputs, (None, *output[1:])))  # the hook reads output[1] only

        handles = [m.register_forward_hook(keep, with_kwargs=True) for m in attention_modules(self.model)]
        cache = DynamicCache()
        try:
            self.model.model(input_ids=ids, past_key_values=cache)
        finally:
            for h in handles:
                h.remove()
        self._ids, self._calls = ids, calls
        self._kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefills += 1

    def cache_for(self, press, ids: torch.Tensor):
        """The ``DynamicCache`` that a prefill of ``ids`` under ``press`` leaves (hooks replayed)."""
        from transformers import DynamicCache

        self.record(ids)
        cache = DynamicCache()
        for idx, (keys, values) in enumerate(self._kv):  # copies: the record stays uncompressed
            cache.update(keys, values, idx)
        with press(self.model):  # kvpress sets the press up for the model (hooks unused)
            for module, inputs, output in self._calls:
                press.forward_hook(module, [], {**inputs, "past_key_values": cache}, output)
        return cache
