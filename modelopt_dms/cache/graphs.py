"""Decode steps of a DMS model replayed from CUDA graphs.

At small batches a GPU decode step is bound by the host: Python and kernel launches, not the
kernels (on an H200 a Llama-3.1-8B-shaped step launches ~90 kernels per layer and the weights take a
fifth of the step time). :class:`GraphDecoder` captures one whole decode step (the model and every
DMS layer's bookkeeping, storage write and attention) in a CUDA graph and replays it, so a step costs
one launch and two small copies.

What makes a DMS step replayable: a decode step edits the cache's tensors in place (slots, flags,
lengths, ring, keys/values, the visibility mask), its shapes depend only on the capacity, and it
reads nothing back to the host. The decoder therefore

- reserves capacity for ``reserve`` more tokens per row in every DMS layer before capturing (the
  graph is valid while the rows fit; then capacity grows by whole blocks and a new graph is captured);
- advances by hand, per replay, the host-side counters a step moves (tokens passed in, the length
  bound, the book version the visibility mask follows);
- captures again whenever anything else edited the cache (a prefill, ``select_rows``, ``release``):
  it checks each layer's book version and tensors before every replay.

Requirements: every attention layer is a DMS layer (a dense layer's ``DynamicLayer`` grows by
concatenation), the blocked layout (paged decode allocates pages on the host), one real token per
row per step (no ``attention_mask``). Run-time switches (``fixed_eviction``, ``eviction_disabled``)
are part of what a graph recorded: change them between steps only with a new decoder. On CPU, or
with ``enabled=False``, steps run eagerly with the same buffers, so code written against it runs
anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from .dms_cache import DMSCache, DMSLayerAdapter
from .layer import DMSCacheLayer

__all__ = ["GraphDecoder"]


def _host_state(layer: DMSCacheLayer) -> tuple[int, int, int, int]:
    """The host-side counters a decode step moves: tokens in, length bound, book version, mask version."""
    return layer.logical, layer.book.max_length_bound, layer.book.version, layer._visible_version


def _set_host_state(layer: DMSCacheLayer, state: tuple[int, int, int, int]) -> None:
    layer.logical, layer.book.max_length_bound, layer.book.version, layer._visible_version = state


def _tensors(layer: DMSCacheLayer) -> tuple[int, ...]:
    """Addresses of the tensors a captured step reads and writes (a graph holds them)."""
    book, kv = layer.book, layer.kv
    state = (book.pos, book.flag, book.length, book.seen, book.ring, kv.k, kv.v, layer._visible)
    return tuple(t.data_ptr() if t is not None else 0 for t in state)


class GraphDecoder:
    """Greedy or sampled decoding of a prefilled :class:`DMSCache`, one replayed graph per step.

    Args:
        model: a DMS model (``apply_dms``) on its device, in eval mode.
        cache: its :class:`DMSCache`, after the prefill (blocked layout, DMS layers only).
        position_ids: ``(B, 1)`` position of the next token of every row; default: the number of
            real tokens each row has seen (what ``generate`` uses with left padding).
        reserve: tokens per row each graph has room for before capacity grows and it is captured again.
        enabled: use CUDA graphs (default: when the model is on CUDA).
        graph_factory: builds a graph object with ``capture()`` (a context manager), ``replay()``
            and ``reset()``; default ``torch.cuda.CUDAGraph`` (tests pass a CPU stand-in).

    :meth:`step` returns the logits ``(B, 1, vocab)`` in a buffer the next step overwrites.

    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: DMSCache,
        position_ids: torch.Tensor | None = None,
        reserve: int = 64,
        enabled: bool | None = None,
        graph_factory: Callable[[], Any] | None = None,
    ) -> None:
        if not isinstance(cache, DMSCache):
            raise TypeError(f"GraphDecoder needs a DMSCache, got {type(cache).__name__}")
        if reserve < 1:
            raise ValueError(f"reserve must be >= 1, got {reserve}")
        self.layers = self._check_layers(cache)
        self.model, self.cache, self.reserve = model, cache, reserve
        book = self.layers[0].book
        device = book.length.device
        self.enabled = (device.type == "cuda" or graph_factory is not None) if enabled is None else enabled
        if self.enabled and graph_factory is None and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on CUDA; pass enabled=False to decode eagerly")
        self._graph_factory = graph_factory or _cuda_graph_factory(device)
        self._positions_from_cache = position_ids is None
        if position_ids is None:
            position_ids = book.seen[:, None]
        if position_ids.shape != (book.batch, 1):
            raise ValueError(f"position_ids must be ({book.batch}, 1), got {tuple(position_ids.shape)}")
        self._ids = torch.zeros(book.batch, 1, dtype=torch.long, device=device)
        self._pos = position_ids.to(device=device, dtype=torch.long).clone()
        self._cache_pos = torch.full((1,), self.layers[0].logical, dtype=torch.long, device=device)
        self._graph: Any = None
        self._logits: torch.Tensor | None = None
        self._steps_left = 0
        self._expected: list[tuple] = []
        self.captures = 0  # graphs captured so far (each covers up to ``reserve`` steps)
        self._remember()

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_layers(cache: DMSCache) -> list[DMSCacheLayer]:
        if not cache.layers:
            raise ValueError("the DMSCache is empty: prefill the prompt first, then decode with GraphDecoder")
        layers = []
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, DMSLayerAdapter) or layer.dms.book is None:
                raise ValueError(
                    f"layer {i} of this cache is not a started DMS layer: GraphDecoder needs every "
                    "attention layer converted by DMS (dense layers grow by concatenation)"
                )
            if layer.dms.layout != "blocked":
                raise ValueError(
                    f"GraphDecoder needs DMSCache(layout='blocked'), this cache is {layer.dms.layout!r} "
                    "(paged decode allocates pages on the host)"
                )
            layers.append(layer.dms)
        return layers

    def _unchanged(self) -> bool:
        """Nothing but this decoder edited the cache since the last replay."""
        return all(
            _host_state(layer) == state and _tensors(layer) == ptrs
            for layer, (state, ptrs) in zip(self.layers, self._expected, strict=True)
        )

    # ------------------------------------------------------------------ steps
    def _resync(self) -> None:
        """After an edit by someone else (a prefill, a batch edit, ``release``): positions again.

        Positions derived from the cache are read from it again (a new turn moved them on, a beam
        reorder permuted them); positions given by hand survive only edits that added no token.
        """
        layers = self._check_layers(self.cache)
        same = [id(x) for x in layers] == [id(x) for x in self.layers]
        if not same or layers[0].book.batch != self._ids.shape[0]:
            raise RuntimeError("the cache's layers or batch size changed: make a new GraphDecoder for it")
        self._steps_left = 0  # capture again
        (remembered_logical, *_), _ = self._expected[0]  # tokens in, as last remembered
        if self._positions_from_cache:
            self._pos.copy_(self.layers[0].book.seen[:, None])
            self._cache_pos.fill_(self.layers[0].logical)
        elif self.layers[0].logical != remembered_logical:
            raise RuntimeError(
                "the cache took tokens outside this GraphDecoder and its position_ids were given by hand: "
                "make a new GraphDecoder with the new positions"
            )

    def _forward(self) -> torch.Tensor:
        """One decode step on the static buffers; moves the positions on in place."""
        out = self.model(
            input_ids=self._ids,
            position_ids=self._pos,
            cache_position=self._cache_pos,
            past_key_values=self.cache,
            use_cache=True,
        ).logits
        self._pos.add_(1)
        self._cache_pos.add_(1)
        return out

    def _prepare(self) -> None:
        """Room for ``reserve`` more tokens in every row of every layer (one host read per layer)."""
        for layer in self.layers:
            bound = layer.book.refresh_bound()
            layer._ensure(bound + self.reserve + 1)
        self._steps_left = min(layer.book.capacity - layer.book.max_length_bound - 1 for layer in self.layers)

    def _capture(self) -> None:
        """Capture one step; the host counters the capture moved are put back (nothing ran)."""
        if self._graph is not None:
            self._graph.reset()
        before = [_host_state(layer) for layer in self.layers]
        self._graph = self._graph_factory()
        with self._graph.capture():
            self._logits = self._forward()
        after = [_host_state(layer) for layer in self.layers]
        self._delta = [
            tuple(a - b for a, b in zip(x, y, strict=True)) for x, y in zip(after, before, strict=True)
        ]
        for layer, state in zip(self.layers, before, strict=True):
            _set_host_state(layer, state)
        self._remember()
        self.captures += 1

    def _remember(self) -> None:
        self._expected = [(_host_state(layer), _tensors(layer)) for layer in self.layers]

    def _replay(self) -> torch.Tensor:
        self._graph.replay()
        expected = []
        for layer, delta, (state, ptrs) in zip(self.layers, self._delta, self._expected, strict=True):
            state = tuple(s + d for s, d in zip(state, delta, strict=True))
            _set_host_state(layer, state)
            expected.append((state, ptrs))  # a replay moves no tensor
        self._expected = expected
        self._steps_left -= 1
        return self._logits

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(B, 1)`` (or ``(B,)``); returns the next-token logits ``(B, 1, V)``."""
        if input_ids.numel() != self._ids.numel():
            raise ValueError(
                f"step takes one token per row of the cache's batch ({self._ids.shape[0]}), "
                f"got input_ids of shape {tuple(input_ids.shape)}"
            )
        self._ids.copy_(input_ids.reshape(self._ids.shape))
        with torch.inference_mode():
            if not self._unchanged():
                self._resync()
            if not self.enabled:
                out = self._forward()
                self._remember()
                return out
            if self._graph is None or self._steps_left < 1:
                self._prepare()
                logits = self._warm_up()  # a real step, eager: also brings every visibility mask up to date
                self._capture()
                return logits
            return self._replay()

    def _warm_up(self) -> torch.Tensor:
        """One eager step (on a side stream on CUDA, as capture requires); its logits."""
        stream = None
        if self._ids.device.type == "cuda":
            stream = torch.cuda.Stream(self._ids.device)
            stream.wait_stream(torch.cuda.current_stream(self._ids.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            logits = self._forward().clone()
        if stream is not None:
            torch.cuda.current_stream(self._ids.device).wait_stream(stream)
        self._steps_left -= 1
        return logits

    def generate(self, first: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy: feed ``first`` ``(B, 1)``, return the ``steps`` tokens chosen after it ``(B, steps)``."""
        tokens, tok = [], first
        for _ in range(steps):
            tok = self.step(tok).argmax(-1)
            tokens.append(tok)
        return torch.cat(tokens, dim=-1)


def _cuda_graph_factory(device: torch.device) -> Callable[[], Any]:
    pool: list = []

    class _Graph:
        def __init__(self) -> None:
            self.graph = torch.cuda.CUDAGraph()

        def capture(self):
            if not pool:
                pool.append(torch.cuda.graph_pool_handle())
            return torch.cuda.graph(self.graph, pool=pool[0])

        def replay(self) -> None:
            self.graph.replay()

        def reset(self) -> None:
            self.graph.reset()

    return _Graph
