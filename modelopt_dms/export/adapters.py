"""Save and load only the DMS part of a model: the decision adapters and the DMS config.

An adapter artifact is a directory with two files, written atomically:

* ``dms_adapters.safetensors``: every parameter whose name contains ``dms_adapter`` (empty for the
  ``borrowed_neuron`` decision kind, which adds no parameters);
* ``dms_adapters.json``: the format version, the ``DMSConfig`` as the ``dms`` mode state holds it, the
  converted layers, parameter names with shapes and dtypes, the model class and a SHA-256 of the
  tensor file.

A model trained with LoRA deltas (``train.lora_rank``, :mod:`modelopt_dms.nn.lora`) saves them too
(``...dms_lora.<proj>.lora_a`` / ``lora_b``) with ``"lora"``: rank, alpha, targets and a digest of the
base weights they were trained on. Loading merges them into those weights and refuses any other base
(another checkpoint, or one the deltas were already merged into).

No pickle is involved: the tensors are safetensors and everything else is JSON. The base weights are
not written; load the artifact onto a model with the same base weights (e.g. the original checkpoint).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import modelopt.torch.opt as mto
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .._version import __version__
from ..config import DMSConfig
from ..conversion import DMS_FORMAT_VERSION, is_dms_model
from ..fileio import (
    atomic_copy_file,
    atomic_save_safetensors,
    atomic_write_json,
    file_sha256,
    publish_dir,
    staging_dir,
)
from ..model_dms import dms_config, dms_mode_state, dms_modules
from ..nn.attention import ADAPTER_ATTR
from ..nn.lora import LORA_ATTR, base_weights_digest, fold_delta, lora_deltas, weight_name
from ..outputs import user_path

__all__ = [
    "ADAPTERS_JSON",
    "ADAPTERS_SAFETENSORS",
    "check_adapters",
    "copy_adapters",
    "init_trainable_from",
    "load_adapters",
    "save_adapters",
]

ADAPTERS_SAFETENSORS = "dms_adapters.safetensors"
ADAPTERS_JSON = "dms_adapters.json"
_SAVE_HINT = "re-create it with modelopt_dms.save_adapters(model, path)"


# ---------------------------------------------------------------------------------------------- helpers
def _current_config(model: nn.Module) -> dict[str, Any]:
    """The DMS config dict of the top-level DMS model (the one the mode was applied to)."""
    if dms_mode_state(model) is None:
        raise ValueError(
            f"{type(model).__name__} has DMS attention layers but no 'dms' mode in its modelopt state: "
            "pass the model that mto.apply_mode / modelopt_dms.apply_dms was called on (the top-level "
            "model, not a submodule)."
        )
    return dms_config(model).model_dump()


def _dms_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ADAPTER_ATTR in name.split(".")}


def _is_lora(name: str) -> bool:
    return LORA_ATTR in name.split(".")


def _lora_entry(model: nn.Module) -> dict[str, Any] | None:
    """The artifact's ``"lora"`` entry for the attached deltas: rank, alpha, scale, targets, base digest."""
    deltas = lora_deltas(model)
    if not deltas:
        return None
    weights = dict(model.named_parameters())
    first = next(iter(deltas.values()))
    return {
        "rank": int(first.lora_a.shape[0]),
        "alpha": float(first.scale * first.lora_a.shape[0]),
        "scale": float(first.scale),
        "targets": sorted({w.rsplit(".", 2)[-2] for w in deltas}),
        "base_weights_sha256": base_weights_digest({w: weights[w] for w in deltas}),
    }


def _lora_record(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The attached LoRA deltas as tensors, and the artifact's ``"lora"`` entry (None without)."""
    entry = _lora_entry(model)
    if entry is None:
        return {}, None
    named = model.named_parameters()
    tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in named if _is_lora(n)}
    return tensors, entry


def _config_differences(saved: dict[str, Any], current: dict[str, Any], what: str) -> str:
    """``"key: saved X vs <what> Y, ..."`` for every DMS config key that differs ("" if none)."""
    diffs = sorted((k, v, current.get(k)) for k, v in saved.items() if v != current.get(k))
    return ", ".join(f"{k}: saved {s!r} vs {what} {c!r}" for k, s, c in diffs)


def _layers(model: nn.Module) -> list[int]:
    return [int(m.layer_idx) for m in dms_modules(model)]


# ---------------------------------------------------------------------------------------------- save
def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the DMS adapters and DMS config of ``model`` into the directory ``path``.

    The directory gets ``dms_adapters.safetensors`` and ``dms_adapters.json`` (other files in it are
    left alone). A new folder, or one holding only an earlier artifact, is written next to ``path``
    and swapped in atomically; in a folder with other files the two files are replaced one by one,
    JSON last, and the JSON records the SHA-256 of the tensor file, so a tensor file from another
    save is detected. ``~`` in ``path`` is the home folder.

    Args:
        model: the top-level model the ``dms`` mode was applied to.
        path: target directory (created if missing).

    Returns:
        The directory as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the model has no DMS, its DMS parameters are not materialised, or ``path`` is a file.

    """
    if not is_dms_model(model):
        raise ValueError(
            f"{type(model).__name__} has no DMS attention: apply the 'dms' mode first "
            "(modelopt_dms.apply_dms(model, config)), train it, then save its adapters."
        )
    config = _current_config(model)
    params = _dms_params(model)
    meta_params = [name for name, p in params.items() if p.device.type == "meta"]
    if meta_params:
        raise ValueError(
            f"DMS parameter {meta_params[0]} is on the meta device (not materialised); load or "
            "initialise the model's weights before saving its adapters."
        )
    tensors = {name: p.detach().to("cpu").contiguous().clone() for name, p in params.items()}
    lora_tensors, lora = _lora_record(model)
    tensors.update(lora_tensors)

    header = {"format": "pt", "dms_format_version": str(DMS_FORMAT_VERSION)}
    return _publish_artifact(
        path, lambda folder: _write_artifact(folder, model, config, tensors, header, lora)
    )


def _publish_artifact(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Put an artifact at ``path``: ``write(folder)`` writes its two files, JSON last.

    A folder holding only an artifact (or nothing) is replaced in one atomic step: it is the
    previous artifact or the new one, never a mix. A folder holding other files too keeps them and
    gets our two files replaced in place, JSON last (a kill in between leaves a pair whose SHA-256
    does not match, which :func:`load_adapters` refuses with a message).
    """
    path = user_path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; the adapters artifact is a directory.")
    if not path.exists() or {p.name for p in path.iterdir()} <= {ADAPTERS_JSON, ADAPTERS_SAFETENSORS}:
        tmp = staging_dir(path)
        try:
            write(tmp)
            publish_dir(tmp, path)
            return path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write(path)
    return path


def copy_adapters(
    source: str | os.PathLike, path: str | os.PathLike, config: DMSConfig | None = None
) -> Path:
    """Copy the adapters artifact ``source`` (a snapshot) to ``path`` byte for byte, LoRA deltas included.

    ``config``: a DMS config to record instead of the source's (e.g. a calibrated ``logit_offset``);
    it must keep the source's structure (decision kind, granularity, window: what the tensors were
    trained for). The tensor file is copied unchanged either way. The same replacement rules as
    :func:`save_adapters`.
    """
    source = Path(source)
    record = check_adapters(source)
    if config is not None:
        saved = _normalise_config(record["dms_config"], source)
        structural = ("decision", "granularity", "window_size")
        changed = sorted(k for k in structural if saved[k] != getattr(config, k))
        if changed:
            raise ValueError(
                f"copy_adapters: the new config changes {', '.join(changed)} of {source}; the adapters "
                "were trained for the saved values, so only thresholds and run settings may change."
            )
        record = {**record, "dms_config": config.model_dump()}

    def write(folder: Path) -> None:
        atomic_copy_file(source / ADAPTERS_SAFETENSORS, folder / ADAPTERS_SAFETENSORS)
        if config is None:  # JSON last: it names the tensors' digest
            atomic_copy_file(source / ADAPTERS_JSON, folder / ADAPTERS_JSON)
        else:
            atomic_write_json(folder / ADAPTERS_JSON, record)

    return _publish_artifact(path, write)


def _write_artifact(
    folder: Path,
    model: nn.Module,
    config: dict,
    tensors: dict[str, torch.Tensor],
    header: dict[str, str],
    lora: dict[str, Any] | None,
) -> None:
    st_file = atomic_save_safetensors(tensors, folder / ADAPTERS_SAFETENSORS, metadata=header)
    record = {
        "format_version": DMS_FORMAT_VERSION,
        "library": "modelopt_dms",
        "library_version": __version__,
        "model_class": type(model).__name__,
        "dms_config": config,
        "dms_layers": _layers(model),
        "params": {name: list(t.shape) for name, t in tensors.items()},
        "dtypes": {name: str(t.dtype).removeprefix("torch.") for name, t in tensors.items()},
        "safetensors_sha256": file_sha256(st_file),
    }
    if lora is not None:
        record["lora"] = lora
    atomic_write_json(folder / ADAPTERS_JSON, record)


# ---------------------------------------------------------------------------------------------- load
def _read_artifact(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate both files; every problem becomes a ValueError with the fix."""
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ValueError(f"DMS adapter directory {path} {what}; {_SAVE_HINT}.")
    json_file, st_file = path / ADAPTERS_JSON, path / ADAPTERS_SAFETENSORS
    for f in (json_file, st_file):
        if not f.is_file():
            raise ValueError(f"DMS adapter file {f.name} is missing from {path}; {_SAVE_HINT}.")
    try:
        record = json.loads(json_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_file} is not valid JSON ({err}); {_SAVE_HINT}.") from err
    if not isinstance(record, dict) or "format_version" not in record:
        raise ValueError(
            f"{json_file} has no 'format_version'; it is not a DMS adapter record ({_SAVE_HINT})."
        )
    version = record["format_version"]
    if type(version) is not int or version != DMS_FORMAT_VERSION:
        raise ValueError(
            f"{json_file} has DMS format version {version!r}, but this modelopt-dms reads format version "
            f"{DMS_FORMAT_VERSION}; load it with the modelopt-dms release that wrote it, or {_SAVE_HINT} "
            "with this release."
        )
    required = {"dms_config": dict, "dms_layers": list, "params": dict, "safetensors_sha256": str}
    for key, kind in required.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(
                f"{json_file} is malformed: '{key}' is missing or not a {kind.__name__}; {_SAVE_HINT}."
            )
    if file_sha256(st_file) != record["safetensors_sha256"]:
        raise ValueError(
            f"{st_file} does not match {json_file} (SHA-256 differs): the files come from different saves "
            f"or the tensor file is damaged; {_SAVE_HINT}."
        )
    try:
        tensors = load_file(str(st_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{st_file} is not a readable safetensors file ({err}); {_SAVE_HINT}.") from err
    listed = record["params"]
    if set(tensors) != set(listed) or any(list(tensors[n].shape) != list(listed[n]) for n in listed):
        raise ValueError(
            f"{st_file} and {json_file} disagree on the saved parameters or their shapes; {_SAVE_HINT}."
        )
    return record, tensors


def check_adapters(path: str | os.PathLike) -> dict[str, Any]:
    """Validate an adapters artifact without a model (cheap: call it before loading one).

    Returns the artifact's record; raises ValueError naming the problem and the fix.
    """
    where = user_path(path)
    record, _ = _read_artifact(where)
    _normalise_config(record["dms_config"], where)
    return record


def _normalise_config(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    try:
        return DMSConfig(**raw).model_dump()
    except (ValidationError, TypeError) as err:
        raise ValueError(
            f"The DMS config saved in {where} is not valid for this modelopt-dms ({err}); {_SAVE_HINT}."
        ) from err


def _check_against(
    model: nn.Module, record: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path
) -> None:
    """Refuse unless ``model``'s DMS layers and parameters match the artifact exactly."""
    layers = _layers(model)
    if layers != list(record["dms_layers"]):
        raise ValueError(
            f"The adapters in {where} were saved for DMS layers {record['dms_layers']}, but this model has "
            f"DMS on layers {layers}: they belong to a different architecture or DMSConfig.layers. Load them "
            f"onto a {record.get('model_class', 'model')} with the same number of layers."
        )
    params = _dms_params(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(
            f"DMS parameter {missing[0]} (and {len(missing) - 1} more) of the model is missing from {where}: "
            f"the adapters were saved from a different model (saved: {record.get('model_class')}, this: "
            f"{type(model).__name__}). Load adapters saved from the same architecture."
        )
    if unexpected:
        raise ValueError(
            f"{where} holds DMS parameter {unexpected[0]} (and {len(unexpected) - 1} more) that this model "
            f"does not have (saved: {record.get('model_class')}, this: {type(model).__name__}). Load "
            "adapters saved from the same architecture."
        )
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(
                f"Shape mismatch for DMS parameter {name}: saved {tuple(tensors[name].shape)}, model "
                f"{tuple(p.shape)}. The adapters in {where} were trained for a different architecture "
                "(hidden size or number of KV heads); load them onto the model they were trained on."
            )


def _lora_plan(
    model: nn.Module, record: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path
) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, float]]:
    """``(weight, A, B, scale)`` per saved delta, checked against ``model`` before anything changes.

    Refuses a malformed ``"lora"`` entry, deltas whose shapes do not fit, a model with deltas of its
    own attached, and base weights other than those the deltas were trained on.
    """
    saved = {n: t for n, t in tensors.items() if _is_lora(n)}
    lora = record.get("lora")
    if lora is None:
        if saved:
            raise ValueError(f"{where} holds LoRA tensors but no 'lora' record; {_SAVE_HINT}.")
        return []
    if (
        not isinstance(lora, dict)
        or not isinstance(lora.get("base_weights_sha256"), str)
        or not isinstance(lora.get("scale"), int | float)
    ):
        raise ValueError(f"{where / ADAPTERS_JSON} has a malformed 'lora' entry; {_SAVE_HINT}.")
    if lora_deltas(model):
        raise ValueError(
            f"{type(model).__name__} has LoRA deltas attached (a model in training): merge them first "
            "(modelopt_dms.nn.lora.merge_lora(model)), or load the adapters onto the original base model."
        )
    modules = dict(model.named_modules())

    def quantized(name: str) -> bool:  # an enabled weight quantizer: calibrated on the unmerged weight
        q = getattr(modules.get(weight_name(name).removesuffix(".weight")), "weight_quantizer", None)
        return bool(getattr(q, "is_enabled", False))

    frozen = [n for n in saved if quantized(n)]
    if frozen:
        raise ValueError(
            f"The adapters in {where} carry LoRA deltas, but {weight_name(frozen[0])} is already "
            "quantized (its calibrated scales would not fit the merged weight): load the adapters "
            "first, then quantize (modelopt_dms.quantize_fp8)."
        )
    weights = dict(model.named_parameters())
    plan, bases = [], {}
    for a_name in sorted(n for n in saved if n.endswith(".lora_a")):
        b_name = a_name.removesuffix(".lora_a") + ".lora_b"
        w = bases[weight_name(a_name)] = weights.get(weight_name(a_name))
        a, b = saved[a_name], saved.get(b_name)
        if w is None or b is None or tuple(w.shape) != (b.shape[0], a.shape[1]) or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"The LoRA delta {a_name} in {where} does not fit this model (no such projection, a missing "
                "lora_b, or other shapes): the adapters were trained on another architecture; load them "
                "onto the model they were trained on."
            )
        plan.append((w, a, b, float(lora["scale"])))
    if len(plan) * 2 != len(saved):
        raise ValueError(f"{where} holds LoRA tensors without their pair (lora_a / lora_b); {_SAVE_HINT}.")
    if base_weights_digest(bases) != lora["base_weights_sha256"]:
        raise ValueError(
            f"The LoRA deltas in {where} were trained on other base weights than this model's (the digest "
            "of its attention projections differs): another checkpoint, or these adapters were already "
            "loaded into it (loading merges the deltas). Load them onto a fresh copy of the base model "
            "they were trained on."
        )
    return plan


def _meta_copy(model: nn.Module) -> nn.Module | None:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # exotic module that cannot be copied: fall back to checking after conversion
        return None


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load DMS adapters written by :func:`save_adapters` into ``model`` and return it.

    If ``model`` has no DMS yet, the ``dms`` mode is applied with the saved config
    (``mto.apply_mode(model, [("dms", config)])``); if it already has DMS, its config must equal the
    saved one. The compatibility checks run before the model is modified (on a meta-device copy), so a
    refused load leaves the model as it was. Tensors are cast to the dtype of the model's parameters.
    Saved LoRA deltas are merged into the base weights they were trained on; any other base, including
    one they were already merged into, is refused.

    Raises:
        ValueError: missing or malformed files, a different format version, a config that differs from
            the model's DMS config, or parameters that are missing, unexpected or of another shape. The
            message names the problem and the fix.

    """
    where = user_path(path)
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device ({meta}, ...): loading adapters "
            "into it would do nothing. Materialise the model first (load its weights, or "
            "model.to_empty(device=...) and load a state dict), then load the adapters."
        )
    record, tensors = _read_artifact(where)
    saved_config = _normalise_config(record["dms_config"], where)
    lora_plan = _lora_plan(model, record, tensors, where)  # before the model is changed
    tensors = {n: t for n, t in tensors.items() if not _is_lora(n)}
    saved_class = record.get("model_class")
    if saved_class and saved_class != type(model).__name__:
        warnings.warn(
            f"The adapters in {where} were saved from a {saved_class}, not a {type(model).__name__}; they "
            "load if the shapes match, but were trained for other base weights.",
            stacklevel=2,
        )

    if is_dms_model(model):
        text = _config_differences(saved_config, _current_config(model), "model")
        if text:
            raise ValueError(
                f"The model already has DMS with a different config than the adapters in {where} ({text}). "
                "Load the adapters onto a model without DMS (load_adapters applies the saved config), or "
                "convert it with the saved config first."
            )
    else:
        shadow = _meta_copy(model)
        if shadow is not None:
            try:
                mto.apply_mode(shadow, [("dms", saved_config)])
            except Exception as err:
                raise ValueError(
                    f"Cannot apply DMS with the config saved in {where} to {type(model).__name__}: {err}"
                ) from err
            _check_against(shadow, record, tensors, where)
            del shadow
        mto.apply_mode(model, [("dms", saved_config)])

    _check_against(model, record, tensors, where)
    params = _dms_params(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    for weight, a, b, scale in lora_plan:
        fold_delta(weight, a, b, scale)
    return model


# ---------------------------------------------------------------------------------------------- warm start
# DMS config keys a warm start may change: the training goal, and the window the new run trains the
# heads for (heads trained with one window start a run that teaches them another).
_WARM_START_MAY_CHANGE = frozenset({"target_compression_ratio", "window_size"})


def init_trainable_from(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Start a model in training from an artifact: its DMS parameters and LoRA deltas take the saved values.

    Unlike :func:`load_adapters` nothing is merged: the saved deltas become the starting values of the
    deltas attached for training (``train.lora_rank`` with the saved rank and alpha), so the run goes on
    training them and its artifact still fits the original base weights. An artifact without deltas
    leaves attached deltas at their zero start. Everything is checked before anything changes.

    ``target_compression_ratio`` may differ (the run's training goal: heads trained for CR 4 can start a
    CR-8 run), and so may ``window_size`` (the run trains the heads for its own window; what they were
    saved with is their starting point, not what the new run computes).

    Returns the artifact's record. Raises ValueError naming the problem and the fix: another DMS
    config (e.g. a calibrated ``logit_offset``), other layers or shapes, deltas the model has no room
    for, or deltas trained on other base weights.
    """
    where = user_path(path)
    record, tensors = _read_artifact(where)
    saved_config = _normalise_config(record["dms_config"], where)
    saved_config = {k: v for k, v in saved_config.items() if k not in _WARM_START_MAY_CHANGE}
    text = _config_differences(saved_config, _current_config(model), "run")
    if text:
        raise ValueError(
            f"train.init_adapters {where} was saved with another DMS config than this run's ({text}): set "
            "the recipe's dms section to the saved values, or start from an artifact of the same config (a "
            "run's snapshot, not a calibrated artifact)."
        )
    saved_lora = {n: t for n, t in tensors.items() if _is_lora(n)}
    _check_against(model, record, {n: t for n, t in tensors.items() if not _is_lora(n)}, where)
    if saved_lora:
        lora = record.get("lora") or {}
        mine = _lora_entry(model)
        if mine is None:
            raise ValueError(
                f"train.init_adapters {where} holds rank-{lora.get('rank')} LoRA deltas but this run trains "
                f"none: set train.lora_rank: {lora.get('rank')} (and lora_alpha: {lora.get('alpha')})."
            )
        attached = {n for n, _ in model.named_parameters() if _is_lora(n)}
        if (lora.get("rank"), lora.get("scale"), set(saved_lora)) != (mine["rank"], mine["scale"], attached):
            raise ValueError(
                f"The LoRA deltas in {where} (rank {lora.get('rank')}, alpha {lora.get('alpha')}, targets "
                f"{lora.get('targets')}) differ from the ones this run attaches (rank {mine['rank']}, alpha "
                f"{mine['alpha']}, targets {mine['targets']}): set train.lora_rank, lora_alpha and "
                "lora_targets to the saved values."
            )
        if mine["base_weights_sha256"] != lora.get("base_weights_sha256"):
            raise ValueError(
                f"The LoRA deltas in {where} were trained on other base weights than this run's model "
                "(the digest of its attention projections differs): start from adapters trained on "
                "the same model.name_or_path and dtype."
            )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return record
