"""KV-cache methods under one interface: uncompressed, DMS (compact cache) and kvpress presses.

Each method feeds an :class:`~modelopt_dms.evaluation.tasks.EvalSample`'s segments, then either
teacher-forces the scored continuation (returning its logits) or decodes greedily (returning the
answer ids), and reports the KV tokens it keeps at *question time* (after the last input segment,
before scoring/decoding; mean over layers and KV heads) and the KV bytes its cache holds then.

Presses on the same context share one recorded prefill (:class:`SharedPrefill`): each press's
own kvpress hook is replayed on it, which gives the hooked prefill's cache without its forward.

Budget matching for presses: kvpress compresses the first segment (the first
``sample.prefix_segments`` together) at prefill, as its own pipeline does, and appends the rest
uncompressed. Given a kept-token target ``K`` (the DMS
model's kept tokens on the same sample), the press keeps ``K - n_rest`` of the ``n_first``
context tokens: ``compression_ratio = 1 - (K - n_rest) / n_first``. ``DMSPress`` has a score
threshold instead of a ratio; it is set per sample from a first scoring pass so that the same
number of (layer, head, token) entries is masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cache import DMSCache, cache_stats
from .config import PRESS_NAMES
from .shared_prefill import SharedPrefill, attention_modules

__all__ = ["DenseMethod", "DMSMethod", "PressMethod", "RunResult", "make_press"]


@dataclass
class RunResult:
    """What one method did on one sample."""

    kept_tokens: float
    input_tokens: int
    kv_bytes: int
    scored_logits: torch.Tensor | None = None
    generated: list[int] | None = None
    target_kept: float | None = None
    feasible: bool = True


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _Method:
    """Shared feeding / decoding; subclasses provide the cache and the step function."""

    name: str
    family: str
    budget: str | None = None

    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = _eos_ids(model, tokenizer)

    def _step(self, cache, ids: torch.Tensor, pos: int) -> torch.Tensor:
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    def _feed(self, cache, sample) -> torch.Tensor | None:
        """Every segment through ``cache`` in order (logical positions); the question's logits."""
        last = None
        for seg in sample.segments:
            last = self._step(cache, seg, 0)
        return last if len(sample.segments) > 1 else None

    def _finish(self, sample, cache, last_logits: torch.Tensor | None, pos: int) -> dict[str, Any]:
        if sample.scored is not None:
            return {"scored_logits": self._step(cache, sample.scored, pos)[0]}
        if last_logits is None:
            raise ValueError(f"sample {sample.key}: QA samples need a question segment after the context")
        generated = [int(last_logits[0, -1].argmax())]
        while len(generated) < sample.max_new_tokens and generated[-1] not in self.eos:
            nxt = torch.tensor([[generated[-1]]])
            generated.append(int(self._step(cache, nxt, pos)[0, -1].argmax()))
            pos += 1
        return {"generated": generated}


class DenseMethod(_Method):
    """The uncompressed model with a standard dynamic cache (the reference)."""

    family = "dense"

    def __init__(self, model: nn.Module, tokenizer, name: str = "uncompressed") -> None:
        super().__init__(model, tokenizer)
        self.name = name

    @torch.inference_mode()
    def run(self, sample, kept_target: float | None = None) -> RunResult:
        """Feed all segments densely; keeps every token."""
        from transformers import DynamicCache

        cache = DynamicCache()
        last = self._feed(cache, sample)
        held = _dynamic_cache_bytes(cache)
        out = self._finish(sample, cache, last, 0)
        return RunResult(
            kept_tokens=float(sample.input_tokens), input_tokens=sample.input_tokens, kv_bytes=held, **out
        )


class DMSMethod(_Method):
    """A DMS model decoding through its compact :class:`DMSCache` (optionally FP8 storage)."""

    family = "dms"

    def __init__(self, model: nn.Module, tokenizer, name: str, budget: str | None = None) -> None:
        super().__init__(model, tokenizer)
        self.name, self.budget = name, budget

    @torch.inference_mode()
    def run(self, sample, kept_target: float | None = None) -> RunResult:
        """Feed all segments through one DMSCache; kept tokens come from :func:`cache_stats`."""
        cache = DMSCache()
        last = self._feed(cache, sample)
        st = cache_stats(cache)
        kept = float(st["tokens_kept"].float().mean())
        out = self._finish(sample, cache, last, 0)
        return RunResult(
            kept_tokens=kept, input_tokens=sample.input_tokens, kv_bytes=int(st["kv_bytes_allocated"]), **out
        )


def make_press(name: str, compression_ratio: float = 0.0, window: int = 64):
    """A kvpress press by short name (see ``PRESS_NAMES``); ``dms_press`` wraps ExpectedAttention."""
    import kvpress

    factories = {
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=compression_ratio),
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=compression_ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=compression_ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=compression_ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=compression_ratio),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=compression_ratio),
        "dms_press": lambda: kvpress.DMSPress(
            press=kvpress.ExpectedAttentionPress(), threshold=-math.inf, sliding_window_size=window
        ),
    }
    if name not in factories:
        raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESS_NAMES)}")
    return factories[name]()


class PressMethod(_Method):
    """A kvpress press on the plain (non-DMS) model: compress the first segment at prefill."""

    family = "kvpress"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        press_name: str,
        budget: str,
        nominal_cr: float,
        window: int = 64,
        shared: SharedPrefill | None = None,
    ) -> None:
        super().__init__(model, tokenizer)
        make_press(press_name)  # fail early on unknown names / missing kvpress
        if press_name == "dms_press" and model.config._attn_implementation == "eager":
            raise ValueError(
                "dms_press masks keys through kvpress's patched attention functions, which eager "
                "attention bypasses: load the model with attn_implementation='sdpa'"
            )
        self.press_name, self.budget, self.nominal_cr, self.window = press_name, budget, nominal_cr, window
        self.shared = shared if shared is not None else SharedPrefill(model)
        if self.shared.model is not model:
            raise ValueError("the shared prefill must record the same model the press compresses")
        self.name = f"{press_name}@{budget}"

    def _step(self, cache, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.press_name == "dms_press" and ids.shape[1] > 1:
            # kvpress hides masked keys with one fake key per head that must score -inf for every
            # query of the call; with many queries at once no such key may exist (ValueError), so
            # DMSPress is fed one token at a time after the prefill (same result: causal).
            steps = [self._step(cache, ids[:, i : i + 1], pos + i) for i in range(ids.shape[1])]
            return torch.cat(steps, dim=1)
        # the compressed cache is shorter than the text: positions must be given explicitly
        position_ids = torch.arange(pos, pos + ids.shape[1]).unsqueeze(0)
        return self.model(
            input_ids=ids, past_key_values=cache, position_ids=position_ids, use_cache=True
        ).logits

    def _prefill(self, press, first: torch.Tensor):
        """The cache after a prefill of ``first`` under ``press`` (the shared record, replayed)."""
        for attn in attention_modules(self.model):  # DMSPress state; kvpress resets it at prefill
            attn.masked_key_indices = None
        return self.shared.cache_for(press, first)

    def _dms_press_threshold(self, first: torch.Tensor, n_mask_per_head: float) -> float:
        """Score once, then pick the threshold that masks the wanted number of entries."""
        press = make_press("dms_press", window=self.window)
        scorer, recorded = press.press, []
        score = scorer.score

        def recording(module, hidden_states, keys, values, attentions, kwargs):
            s = score(module, hidden_states, keys, values, attentions, kwargs)
            recorded.append(s[..., : max(0, s.shape[-1] - self.window)].reshape(-1).float())
            return s

        scorer.score = recording
        self._prefill(press, first)
        flat = torch.cat(recorded) if recorded else torch.zeros(0)
        heads = flat.numel() / max(1, first.shape[1] - self.window)
        n_mask = int(round(n_mask_per_head * heads))
        if n_mask <= 0 or flat.numel() == 0:
            return -math.inf
        if n_mask >= flat.numel():
            return math.inf
        return float(flat.sort().values[n_mask])  # entries strictly below are masked

    @torch.inference_mode()
    def run(self, sample, kept_target: float | None = None) -> RunResult:
        """Compress the first segment to match ``kept_target`` (default: nominal ratio), append the rest."""
        k = sample.prefix_segments
        first, rest = torch.cat(sample.segments[:k], dim=1), sample.segments[k:]
        n_first, n_rest = int(first.shape[1]), sum(int(s.shape[1]) for s in rest)
        target = kept_target if kept_target is not None else sample.input_tokens / self.nominal_cr
        feasible = target - n_rest >= 1
        keep_first = min(max(round(target - n_rest), 1), n_first)  # whole tokens per head
        if self.press_name == "dms_press":
            press = make_press("dms_press", window=self.window)
            press.threshold = self._dms_press_threshold(first, n_first - (target - n_rest))
        else:  # kvpress keeps int(n * (1 - ratio)): aim half a token up so float error cannot drop one
            ratio = 0.0 if keep_first >= n_first else 1.0 - (keep_first + 0.5) / n_first
            press = make_press(self.press_name, compression_ratio=ratio)
        try:
            cache = self._prefill(press, first)
            pos, last = n_first, None
            for seg in rest:
                last = self._step(cache, seg, pos)
                pos += int(seg.shape[1])
            kept = self._kept_tokens(cache)
            held = _dynamic_cache_bytes(cache)
            out = self._finish(sample, cache, last, pos)
        finally:  # masks of a DMSPress run must not leak into the next method on this model
            for attn in attention_modules(self.model):
                attn.masked_key_indices = None
        return RunResult(
            kept_tokens=kept,
            input_tokens=sample.input_tokens,
            kv_bytes=held,
            target_kept=float(target),
            feasible=feasible,
            **out,
        )

    def _kept_tokens(self, cache) -> float:
        """Mean kept tokens per (layer, KV head); DMSPress masks entries instead of removing them."""
        lengths = []
        attns = attention_modules(self.model)
        for layer, attn in zip(cache.layers, attns, strict=True):
            b, h, n, _ = layer.keys.shape
            masked = 0
            if self.press_name == "dms_press":
                idx = attn.masked_key_indices
                masked = 0 if idx is None else len(idx[0])
            lengths.append(n - masked / (b * h))
        return float(sum(lengths) / len(lengths))
