"""ONNX export of one DMS generation step, with the compact KV cache as graph inputs/outputs.

The exported graph computes one forward step of a DMS decoder (prefill chunk or decode token) for a
caller-managed compact cache (docs/design.md §2, "Inference data path"):

Inputs
    ``input_ids (B, T)`` int64, ``position_ids (B, T)`` int64 (RoPE positions of the new tokens), and per
    layer ``l`` the padded compact cache of every (batch row, KV head):
    ``past_key_l``/``past_value_l (B, Hkv, L_l, D)`` (keys after RoPE), ``past_pos_l (B, Hkv, L_l)`` int64
    token positions, ``past_flag_l`` bool (flagged for eviction), ``past_valid_l`` bool (slot used) and
    ``past_last_l`` bool (the slot of the row's newest token, whose flag is still pending).
Outputs
    ``logits (B, T, V)`` and per layer ``new_key_l``/``new_value_l (B, Hkv, T, D)`` (after RoPE) and
    ``decisions_l (B, Hkv, T)`` bool (``logit > 0``: the decision each new token emits about its
    predecessor).

Layers that DMS did not convert read neither ``past_flag_l`` nor ``past_last_l``; the exporter drops such
unread inputs from the graph, so feed only the inputs the loaded graph declares.

Dynamic axes: ``B``, ``T`` and every ``L_l`` (rows are padded to the longest row of their layer; an empty
cache is ``L_l = 0``). Inside the graph, per layer, the ``T`` new queries attend to the valid past slots and
the new tokens under the hard DMS rule: key ``k`` is visible to query ``q`` iff ``pos_k <= pos_q`` and not
(``flag_k`` and ``pos_q - pos_k > w``). The pending slot (``past_last``) takes the first new token's decision
as its flag, new token ``t`` takes the decision of token ``t + 1`` and the newest new token stays pending,
so a chunk whose later queries are more than ``w`` tokens past the previous newest token is handled exactly.
Decisions are shared by the query heads of a GQA group.

Rows of a batch may carry different numbers of real new tokens: pad the short rows at the end and give
the padding positions larger than every real position of the call (they are then invisible to the real
queries); the caller drops their outputs. :class:`modelopt_dms.export.onnx_runtime.OnnxDMSGenerator`
does this.

The graph reuses the model's own modules: embeddings, decoder layers (layernorms, projections, q/k norms,
MLP), rotary embedding, final norm and LM head are called as they are, and every DMS attention layer runs
its own ``forward`` (adapter or borrowed-neuron decision via ``_decision_logits`` /
``_zero_borrowed_channel``, residual input from the decoder layer's pre-hook, RoPE) with a graph-building
cache object in place of :class:`~modelopt_dms.cache.DMSCache`. Layers that DMS did not convert (a
``DMSConfig.layers`` subset) run their original attention over the same cache tensors and emit all-False
decisions (they never evict).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import TEMP_MARK, umask_mode
from ..model_dms import dms_modules
from ..nn.attention import DMSAttention
from ..nn.masks import grouped_attention
from ..outputs import OutputError, ensure_writable_parent, user_path
from .hf_checkpoint import dms_config_block

__all__ = ["ONNX_FORMAT", "DMSStepGraph", "export_onnx", "onnx_io_names"]

ONNX_FORMAT = "modelopt_dms.onnx_step.v1"
PAST_FIELDS = ("key", "value", "pos", "flag", "valid", "last")
NEW_FIELDS = ("key", "value")


def onnx_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported step graph, in order."""
    inputs = ["input_ids", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_{f}_{i}" for f in PAST_FIELDS]
        outputs += [f"new_key_{i}", f"new_value_{i}", f"decisions_{i}"]
    return inputs, outputs


class _GraphCache:
    """Stands in for ``DMSCache`` while tracing: attention over padded compact-cache tensors.

    DMS layers call :meth:`dms_attend` (the ``DMSCache`` protocol); unconverted layers call
    :meth:`update` like any transformers cache and receive the matching additive mask from the wrapper.
    """

    is_dms_cache = True

    def __init__(self, past: list[tuple[torch.Tensor, ...]], position_ids: torch.Tensor) -> None:
        self.past = past
        self.position_ids = position_ids
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _new_positions(self, num_kv: int) -> torch.Tensor:
        return self.position_ids[:, None, :].expand(-1, num_kv, -1)  # (B, Hkv, T)

    def dms_attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        decisions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        window_size: int,
        kv_scales: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Hard-masked GQA attention of the new queries over valid past slots and new tokens."""
        pk, pv, ppos, pflag, pvalid, plast = self.past[layer_idx]
        d = decisions.bool()
        self.outputs[layer_idx] = (key, value, d)
        num_kv = key.shape[1]
        # the row's newest past token takes the first new decision; new token t takes d_{t+1}
        flag_past = (plast & d[..., :1]) | (~plast & pflag)  # (bool Where has no ORT kernel)
        new_flag = torch.cat([d[..., 1:], torch.zeros_like(d[..., :1])], dim=-1)
        new_pos = self._new_positions(num_kv)
        keys = torch.cat([pk.to(key.dtype), key], dim=2)
        vals = torch.cat([pv.to(value.dtype), value], dim=2)
        pos = torch.cat([ppos, new_pos], dim=-1)
        flag = torch.cat([flag_past, new_flag], dim=-1)
        valid = torch.cat([pvalid, torch.ones_like(new_flag)], dim=-1)
        diff = new_pos[..., :, None] - pos[..., None, :]  # (B, Hkv, T, L + T)
        evicted = flag[..., None, :] & (diff > window_size)
        visible = valid[..., None, :] & (diff >= 0) & ~evicted
        return grouped_attention(query, keys, vals, scaling, mask=visible)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        """Dense path of an unconverted layer: past slots + new tokens, no eviction."""
        pk, pv = self.past[layer_idx][:2]
        no_evict = torch.zeros(key_states.shape[:-1], dtype=torch.bool, device=key_states.device)
        self.outputs[layer_idx] = (key_states, value_states, no_evict)
        keys = torch.cat([pk.to(key_states.dtype), key_states], dim=2)
        vals = torch.cat([pv.to(value_states.dtype), value_states], dim=2)
        return keys, vals

    def dense_mask(self, layer_idx: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``(B, 1, T, L + T)`` mask for an unconverted layer (head 0's slots; rows are equal)."""
        _, _, ppos, _, pvalid, _ = self.past[layer_idx]
        new_pos = self.position_ids
        pos = torch.cat([ppos[:, 0], new_pos], dim=-1)  # (B, L + T)
        valid = torch.cat([pvalid[:, 0], torch.ones_like(new_pos, dtype=torch.bool)], dim=-1)
        visible = valid[:, None, :] & (new_pos[:, :, None] >= pos[:, None, :])  # (B, T, L + T)
        zero = torch.zeros((), dtype=dtype, device=pos.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=pos.device)
        return torch.where(visible, zero, neg)[:, None]


class DMSStepGraph(nn.Module):
    """Torch module whose trace is the ONNX step graph (see the module docstring for the I/O)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = len(model.model.layers)
        self.dms_layers = {int(m.layer_idx) for m in model.modules() if isinstance(m, DMSAttention)}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past_flat: torch.Tensor):
        """One step: ``(logits, new_key_0, new_value_0, decisions_0, ...)``."""
        n = len(PAST_FIELDS)
        past = [tuple(past_flat[i * n : (i + 1) * n]) for i in range(self.num_layers)]
        cache = _GraphCache(past, position_ids)
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(inner.layers):
            mask = None if i in self.dms_layers else cache.dense_mask(i, hidden.dtype)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                cache_position=None,
                position_embeddings=position_embeddings,
            )
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        logits = self.model.lm_head(inner.norm(hidden))
        outs: list[torch.Tensor] = [logits]
        for i in range(self.num_layers):
            outs.extend(cache.outputs[i])
        return tuple(outs)


# ---------------------------------------------------------------------------------------------- checks
def _enabled_quantizers(model: nn.Module) -> list[str]:
    try:
        from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError:  # pragma: no cover - modelopt is a dependency
        return []
    return [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled]


def _check_exportable(model: nn.Module) -> list[DMSAttention]:
    mods = dms_modules(model)
    if not mods:
        raise ValueError(
            "export_onnx needs a DMS model: apply the 'dms' mode first (modelopt_dms.apply_dms(model, cfg)); "
            f"{type(model).__name__} has no DMS attention layer."
        )
    quantized = _enabled_quantizers(model)
    if quantized:
        raise ValueError(
            "export_onnx does not export fake-quantized (e.g. FP8) models: the step graph is a "
            f"floating-point graph and the model has {len(quantized)} enabled quantizers (first: "
            f"{quantized[0]}). Export the DMS model before mtq.quantize, or deploy the FP8 model through "
            "the unified Hugging Face checkpoint (modelopt_dms.export_hf_checkpoint)."
        )
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "rotary_emb", "norm")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        raise ValueError(
            f"export_onnx supports Hugging Face causal LMs laid out as model.model.{{{', '.join(needed)}}} + "
            f"lm_head (Llama, Mistral, Qwen2, Qwen3); got {type(model).__name__}."
        )
    if any(m.dms_switches.keep_every is not None for m in mods):
        raise ValueError(
            "export_onnx: a fixed_eviction(...) context is active; the graph exports learned decisions only."
        )
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type == "dynamic":
        raise ValueError(
            "export_onnx: dynamic NTK RoPE depends on the sequence length at run time; unsupported."
        )
    return mods


@contextlib.contextmanager
def _export_state(model: nn.Module, mods: list[DMSAttention]):
    """Eval mode, no decision recording, residual slots cleared; everything restored afterwards."""
    was_training = model.training
    records = [m.dms_switches.record for m in mods]
    model.eval()
    for m in mods:
        m.dms_switches.record = False
    try:
        yield
    finally:
        for m, rec in zip(mods, records, strict=True):
            m.dms_switches.record = rec
            m.dms_switches.residual = None
        model.train(was_training)


def _dummy_inputs(model: nn.Module, batch: int, new: int, past: int) -> tuple[torch.Tensor, ...]:
    """Example inputs (shapes chosen distinct and > 1 so no axis gets specialised while tracing)."""
    cfg = model.config
    num_layers = len(model.model.layers)
    ref = model.model.layers[0].self_attn
    num_kv = ref.k_proj.out_features // ref.head_dim
    head_dim = ref.head_dim
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, new), generator=gen).to(param.device)
    pos = (torch.arange(new) + past).expand(batch, new).contiguous().to(param.device)
    args: list[torch.Tensor] = [ids, pos]
    for _ in range(num_layers):
        kv = (batch, num_kv, past, head_dim)
        row = (batch, num_kv, past)
        last = torch.zeros(row, dtype=torch.bool)
        last[..., -1] = True
        args += [
            torch.randn(kv, generator=gen).to(param),
            torch.randn(kv, generator=gen).to(param),
            torch.arange(past).expand(row).contiguous().to(param.device),
            (torch.rand(row, generator=gen) > 0.5).to(param.device),
            torch.ones(row, dtype=torch.bool, device=param.device),
            last.to(param.device),
        ]
    return tuple(args)


def _dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new_tokens"},
        "position_ids": {0: "batch", 1: "new_tokens"},
        "logits": {0: "batch", 1: "new_tokens"},
    }
    for i in range(num_layers):
        for f in PAST_FIELDS:
            axes[f"past_{f}_{i}"] = {0: "batch", 2: f"past_len_{i}"}
        for f in (*NEW_FIELDS, "decisions"):
            axes[f"new_{f}_{i}" if f in NEW_FIELDS else f"{f}_{i}"] = {0: "batch", 2: "new_tokens"}
    return axes


def _metadata(
    model: nn.Module, mods: list[DMSAttention], limits: dict[str, int], opset: int
) -> dict[str, str]:
    ref = model.model.layers[0].self_attn
    block = dms_config_block(model)
    return {
        "format": ONNX_FORMAT,
        "dms_config": json.dumps(block, sort_keys=True),
        "window_size": str(mods[0].dms_config.window_size),
        "num_layers": str(len(model.model.layers)),
        "dms_layers": json.dumps(sorted(int(m.layer_idx) for m in mods)),
        "num_kv_heads": str(ref.k_proj.out_features // ref.head_dim),
        "head_dim": str(ref.head_dim),
        "vocab_size": str(model.config.vocab_size),
        "model_type": str(getattr(model.config, "model_type", "")),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "opset": str(opset),
        **{f"profile_{k}": str(v) for k, v in limits.items()},
    }


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    opset: int = 17,
    max_past: int = 4096,
    max_batch: int = 8,
    max_new_tokens: int = 512,
    dynamo: bool | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export one DMS generation step of ``model`` as an ONNX graph with the compact cache as I/O.

    Args:
        model: a DMS model (Llama / Mistral / Qwen2 / Qwen3 family; adapter or borrowed-neuron decisions,
            ``head`` or ``layer`` granularity), not fake-quantized.
        path: target ``.onnx`` file (its folder is created; weights over 2 GB go to external data beside it).
        opset: ONNX opset.
        max_past: largest padded past length ``L`` a deployment feeds; the graph accepts any ``L``, the value
            is recorded in the file's metadata as the upper bound of the TensorRT optimisation profile.
        max_batch: upper bound of ``B`` for the profile (metadata only).
        max_new_tokens: upper bound of ``T`` (largest prefill chunk) for the profile (metadata only).
        dynamo: ``None`` tries the TorchScript exporter (``dynamo=False``) and falls back to the
            ``torch.export``-based exporter; ``True``/``False`` forces one.
        check: validate the written file with ``onnx.checker``.
        overwrite: replace an existing step graph at ``path`` (never any other file).

    Returns:
        The path of the written file. Metadata props (``format``, ``window_size``, ``num_layers``,
        ``num_kv_heads``, ``head_dim``, ``dms_config`` JSON, ``profile_*``) describe the graph.

    Raises:
        ValueError: not a DMS model, a fake-quantized model, or an unsupported layout.

    """
    mods = _check_exportable(model)
    path = check_onnx_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    final, path = path, path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}.onnx")
    try:
        _export_to(model, mods, path, opset, max_past, max_batch, max_new_tokens, dynamo, check)
        os.chmod(path, umask_mode(0o666))
        os.replace(path, final)
    finally:
        path.unlink(missing_ok=True)
    return final


def check_onnx_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise unless ``path`` can receive an ONNX step graph (cheap: call it before heavy work).

    A missing path is fine; an existing file is replaced only with ``overwrite`` and only if it is
    a step graph written by :func:`export_onnx` (its metadata says so).
    """
    import onnx

    path = user_path(path)
    if path.is_dir():
        raise OutputError(
            f"ONNX target {path} is a folder; export_onnx writes a file (e.g. {path / 'step.onnx'})."
        )
    if path.exists():
        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception:  # noqa: BLE001 - any unreadable file is not ours
            props = {}
        if props.get("format") != ONNX_FORMAT:
            raise OutputError(
                f"ONNX target {path} exists and is not a step graph written by modelopt-dms; it is left "
                "alone. Choose another path."
            )
        if not overwrite:
            raise FileExistsError(f"ONNX target {path} exists; pass overwrite=True (CLI: --overwrite).")
    ensure_writable_parent(path, "ONNX target")
    return path


def _export_to(model, mods, path: Path, opset, max_past, max_batch, max_new_tokens, dynamo, check) -> None:
    import onnx

    num_layers = len(model.model.layers)
    input_names, output_names = onnx_io_names(num_layers)
    wrapper = DMSStepGraph(model)
    args = _dummy_inputs(model, batch=2, new=3, past=5)
    axes = _dynamic_axes(num_layers)
    errors: list[str] = []
    with _export_state(model, mods), torch.no_grad():
        for use_dynamo in [False, True] if dynamo is None else [dynamo]:
            try:
                _run_exporter(wrapper, args, path, input_names, output_names, axes, opset, use_dynamo)
                break
            except Exception as err:  # noqa: BLE001 - report every exporter's failure together
                errors.append(f"{'dynamo' if use_dynamo else 'torchscript'} exporter: {err!r}")
        else:
            raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))

    proto = onnx.load(str(path), load_external_data=False)
    limits = {"max_past": int(max_past), "max_batch": int(max_batch), "max_new_tokens": int(max_new_tokens)}
    for key, value in _metadata(model, mods, limits, opset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    if check:
        onnx.checker.check_model(str(path))


def _run_exporter(wrapper, args, path, input_names, output_names, axes, opset, use_dynamo) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation warnings of the legacy exporter
        if not use_dynamo:
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
            return
        from torch.export import Dim

        batch, new = Dim("batch", min=1), Dim("new_tokens", min=1)
        past_shapes: list[Any] = []
        for i in range(len(args[2:]) // len(PAST_FIELDS)):
            past = Dim(f"past_len_{i}", min=0)
            past_shapes += [{0: batch, 2: past}] * len(PAST_FIELDS)
        shapes = ({0: batch, 1: new}, {0: batch, 1: new}, tuple(past_shapes))  # forward(ids, pos, *past)
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=shapes,
            opset_version=max(opset, 18),
            dynamo=True,
            external_data=False,
        )
