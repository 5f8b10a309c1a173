"""The DMS attention module: an in-place dynamic subclass of a Hugging Face attention class.

One forward serves every supported family (Llama, Mistral, Qwen2, Qwen3): q/k/v projections,
optional q/k norms, decision logits, RoPE, then one of four attention paths:

* eviction disabled: the model's own attention function and cache (the teacher; exact original);
* a :class:`~modelopt_dms.cache.DMSCache`: compact per-head cache (inference);
* training: soft delayed-eviction bias with noisy, straight-through decisions;
* eval without a DMS cache: dense attention under the hard mask (the masked reference path).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from modelopt.torch.opt.dynamic import DynamicModule, _DMRegistryCls
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..config import DMSConfig
from .decisions import DMSDecisionAdapter, relaxed_decisions, row_noise
from .dtypes import as_dtype
from .flex_training import flex_training_attention
from .masks import (
    dense_visibility,
    diagonal_validity,
    document_continuation,
    grouped_attention,
    hard_visibility,
    soft_eviction_bias,
)
from .memo import LastForTensor
from .sdpa_training import sdpa_training_attention

__all__ = ["ADAPTER_ATTR", "DMSAttention", "DMSAttentionRegistry", "DMSSwitches"]

# The registry of attention classes DMS converts (filled by modelopt_dms.plugins.huggingface).
DMSAttentionRegistry = _DMRegistryCls("DMS")
ADAPTER_ATTR = "dms_adapter"  # submodule name of the decision adapter; its parameters contain it


@dataclass
class DMSSwitches:
    """Run-time state of one DMS attention module (never saved; the settings are its DMSConfig)."""

    eviction_disabled: bool = False  # teacher mode: the original attention
    step: int = 0  # seeds the training noise
    rows: torch.Tensor | None = None  # global ids of the batch rows (training noise); None: 0..B-1
    keep_every: int | None = None  # fixed eviction pattern (model_dms.fixed_eviction)
    record: bool = True  # keep the last decisions for the compression loss
    training_kernel: str = "eager"  # "eager" (T x T bias: the oracle), "sdpa" (fused, CPU), "flex" (CUDA)
    residual: torch.Tensor | None = None  # decoder layer input, handed over by the residual hook
    last_decisions: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> DMSSwitches:
        """Copy the switches, not the last forward's tensors (an autograd graph cannot be copied)."""
        return DMSSwitches(
            eviction_disabled=self.eviction_disabled,
            step=self.step,
            keep_every=self.keep_every,
            record=self.record,
            training_kernel=self.training_kernel,
        )


def _continuation(mask: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor | None:
    """Where packed documents end (from a 4D block-diagonal mask); None without a 4D mask."""
    if mask is None or mask.shape[-2] != mask.shape[-1] or mask.shape[-2] < 2:
        return None
    return document_continuation(mask, valid)


_TRAINING_MASKS = LastForTensor()


def _training_masks(attention_mask: Any, bsz: int, q_len: int, k_len: int) -> tuple:
    """``(valid, visible, document ends)`` of the model's mask for a training forward.

    The layers of a forward receive the same mask tensor, so this is computed once per forward and
    the layers share one ``visible`` tensor (the flex kernel's block mask is keyed on it).
    """

    def make() -> tuple:
        valid = diagonal_validity(attention_mask, q_len, 0, bsz)
        visible = dense_visibility(attention_mask, bsz, q_len, k_len)
        return valid, visible, _continuation(visible, valid)

    if not isinstance(attention_mask, torch.Tensor):  # None (cheap) or a flex BlockMask
        return make()
    return _TRAINING_MASKS.get(attention_mask, (bsz, q_len, k_len), make)


def _is_dynamic(cache: Any) -> bool:
    """True for a transformers DynamicCache (every layer a plain, growing DynamicLayer)."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _pattern_logits(
    logits: torch.Tensor, cache_position: torch.Tensor | None, keep_every: int
) -> torch.Tensor:
    """Replace decisions by a fixed pattern: key ``k`` is kept iff ``k % keep_every == 0``."""
    num = logits.shape[-1]
    pos = cache_position if cache_position is not None else torch.arange(num, device=logits.device)
    evict = ((pos[-num:] - 1) % keep_every) != 0  # d_t governs key t - 1
    return as_dtype(torch.where(evict, 1.0, -1.0), logits.dtype).expand_as(logits)


class DMSAttention(DynamicModule):
    """DMS version of a decoder attention layer (created by the ``dms`` mode, not by hand).

    ``dms_config`` is the frozen :class:`DMSConfig` the mode applied; ``dms_switches`` the
    run-time :class:`DMSSwitches`.
    """

    def _setup(self, config: DMSConfig | None = None) -> None:
        self.dms_config = config if config is not None else DMSConfig()
        self.dms_switches = DMSSwitches()
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        if self.dms_config.decision == "adapter":
            ref = self.k_proj.weight
            adapter = DMSDecisionAdapter(
                self.config.hidden_size,
                self.num_kv_heads,
                eps=getattr(self.config, "rms_norm_eps", 1e-6),
                device=ref.device,
                dtype=ref.dtype,
            )
            self.add_module(ADAPTER_ATTR, adapter)

    @property
    def _hf_module(self) -> Any:
        """The transformers modeling module of the original class (RoPE, attention functions)."""
        return sys.modules[self.get_original_cls_by_level(level=0).__module__]

    # ------------------------------------------------------------------ decisions
    def _decision_logits(self, query: torch.Tensor) -> torch.Tensor:
        """Decision logits ``(B, Hkv, T)`` in float32 (before noise and temperature)."""
        cfg, sw = self.dms_config, self.dms_switches
        if cfg.decision == "adapter":
            if sw.residual is None:
                raise RuntimeError(
                    "DMS adapter decision needs the decoder layer's residual input; the layer "
                    "hook did not run. Call the whole model (or its decoder layer), not the "
                    "attention module alone."
                )
            raw = as_dtype(self.get_submodule(ADAPTER_ATTR)(sw.residual).transpose(1, 2), torch.float32)
        else:
            bsz, _, q_len, _ = query.shape
            group = query.shape[1] // self.num_kv_heads
            borrowed = query.view(bsz, self.num_kv_heads, group, q_len, -1)[:, :, 0, :, -1]
            raw = as_dtype(borrowed, torch.float32)
        logits = cfg.logit_scale * raw - cfg.logit_offset
        if cfg.granularity == "layer":
            logits = logits[:, :1].expand_as(logits)
        return logits

    def _zero_borrowed_channel(self, query: torch.Tensor) -> torch.Tensor:
        """Zero the last channel of the first query head of every GQA group."""
        group = query.shape[1] // self.num_kv_heads
        keep = torch.ones(query.shape[1], query.shape[-1], dtype=query.dtype, device=query.device)
        keep[::group, -1] = 0
        return query * keep[None, :, None, :]

    def _noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Training noise ``(B, Hkv, T)``: a function of (seed, step, layer, row id, head, position)."""
        sw = self.dms_switches
        seed = (self.dms_config.noise_seed * 1_000_003 + sw.step) * 4099 + int(self.layer_idx)
        rows = sw.rows if sw.rows is not None else torch.arange(shape[0], device=device)
        if rows.shape[0] != shape[0]:
            raise ValueError(f"dms.set_step(rows=...) named {rows.shape[0]} rows, the batch has {shape[0]}")
        return row_noise(seed, rows.to(device), shape[1], shape[2])

    # ------------------------------------------------------------------ hooks for chaining
    def _dms_kv_storage_scales(self) -> tuple[float, float] | None:
        """FP8 storage scales for the DMS cache; None here (set by the quantized DMS attention)."""
        return None

    def _dms_quantize_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity here; the quantized DMS attention applies its k/v quantizers."""
        return key, value

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same signature and outputs as the Hugging Face attention it replaces."""
        cfg, sw = self.dms_config, self.dms_switches
        residual, sw.residual = sw.residual, None
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)

        borrowed = cfg.decision == "borrowed_neuron"
        logits = None
        if not sw.eviction_disabled or borrowed:
            sw.residual = residual
            logits = self._decision_logits(query)
            sw.residual = None
            if sw.keep_every is not None:
                logits = _pattern_logits(logits, cache_position, sw.keep_every)
        if borrowed:
            query = self._zero_borrowed_channel(query)
        cos, sin = position_embeddings
        query, key = self._hf_module.apply_rotary_pos_emb(query, key, cos, sin)
        if borrowed:
            query = self._zero_borrowed_channel(query)
        key, value = self._dms_quantize_kv(key, value)

        if sw.eviction_disabled:
            out = self._standard_attention(
                query, key, value, attention_mask, past_key_values, cos, sin, cache_position, **kwargs
            )
        elif getattr(past_key_values, "is_dms_cache", False):
            decisions = logits > 0
            self._record(decisions)  # bool; collect_decisions returns floats
            out = past_key_values.dms_attend(
                self.layer_idx,
                query,
                key,
                value,
                decisions,
                attention_mask,
                self.scaling,
                cfg.window_size,
                kv_scales=self._dms_kv_storage_scales,  # read once, when the layer starts
            )
        elif self.training:
            out = self._training_attention(query, key, value, logits, attention_mask, past_key_values)
        else:
            out = self._hard_masked_attention(query, key, value, logits, attention_mask, past_key_values)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None

    def _record(self, decisions: torch.Tensor) -> None:
        if self.dms_switches.record:
            self.dms_switches.last_decisions = decisions

    def _standard_attention(
        self, query, key, value, attention_mask, past_key_values, cos, sin, cache_position, **kwargs
    ):
        if past_key_values is not None:
            if getattr(past_key_values, "is_dms_cache", False):
                no_evict = torch.zeros(key.shape[:-1], dtype=torch.bool, device=key.device)
                return past_key_values.dms_attend(
                    self.layer_idx,
                    query,
                    key,
                    value,
                    no_evict,
                    attention_mask,
                    self.scaling,
                    self.dms_config.window_size,
                    kv_scales=self._dms_kv_storage_scales,  # read once, when the layer starts
                )
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            key, value = past_key_values.update(key, value, self.layer_idx, cache_kwargs)
        interface = self._hf_module.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._hf_module.eager_attention_forward
        )
        sliding = getattr(self, "sliding_window", None)
        extra = {"sliding_window": sliding} if sliding is not None else {}
        out, _ = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
        return out

    def _training_attention(self, query, key, value, logits, attention_mask, past_key_values):
        if past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0:
            raise RuntimeError("DMS training forward takes whole sequences: pass use_cache=False.")
        cfg = self.dms_config
        noise = self._noise(tuple(logits.shape), logits.device)
        z, hard = relaxed_decisions(logits, cfg.temperature, noise)
        if cfg.granularity == "layer":
            z, hard = z[:, :1].expand_as(z), hard[:, :1].expand_as(hard)
        self._record(hard)
        valid, mask, cont = _training_masks(attention_mask, query.shape[0], query.shape[2], key.shape[2])
        if self.dms_switches.training_kernel == "flex":
            return flex_training_attention(
                query, key, value, z, cfg.window_size, self.scaling, mask, valid, cont
            )
        if self.dms_switches.training_kernel == "sdpa":
            return sdpa_training_attention(
                query, key, value, z, cfg.window_size, self.scaling, mask, valid, cont
            )
        bias = soft_eviction_bias(z, cfg.window_size, valid, cont)
        return grouped_attention(query, key, value, self.scaling, mask=mask, bias=bias)

    def _hard_masked_attention(self, query, key, value, logits, attention_mask, past_key_values):
        if past_key_values is not None and not _is_dynamic(past_key_values):
            raise ValueError(
                f"DMS attention got a {type(past_key_values).__name__}: a DMS model runs with its DMSCache "
                "(generate's default), a DynamicCache (the masked reference) or no cache."
            )
        decisions = logits > 0
        self._record(decisions)
        bsz, _, q_len, _ = query.shape
        past_len = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        valid = diagonal_validity(attention_mask, q_len, past_len, bsz)
        if valid is None:
            valid = torch.ones(bsz, q_len, dtype=torch.bool, device=query.device)
        if past_key_values is not None:
            history = past_key_values.__dict__.setdefault("_dms_decision_history", {})
            past = history.get(self.layer_idx)
            if past is not None:
                decisions = torch.cat([past[0], decisions], dim=-1)
                valid = torch.cat([past[1], valid], dim=-1)
            history[self.layer_idx] = (decisions, valid)
            key, value = past_key_values.update(key, value, self.layer_idx, {})
        k_len = key.shape[2]
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)
        window = self.dms_config.window_size
        hf_mask = dense_visibility(attention_mask, bsz, q_len, k_len)
        cont = _continuation(hf_mask, valid) if q_len == k_len else None
        visible = hard_visibility(decisions, window, q_pos, valid, cont)
        if hf_mask is not None:
            visible = visible & hf_mask
        return grouped_attention(query, key, value, self.scaling, mask=visible)
