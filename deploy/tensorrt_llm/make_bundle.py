#!/usr/bin/env python3
"""Make a TensorRT-LLM serving bundle from a modelopt-dms unified Hugging Face export.

Input: a folder written by ``modelopt_dms.export_hf_checkpoint`` (``config.json`` with a ``dms_config``
block, safetensors, optional ``hf_quant_config.json`` for FP8). Output folder::

    checkpoint/                    the checkpoint (symlink to the export, a copy, or a copy without the DMS
                                   adapter tensors: --checkpoint-mode symlink|copy|strip-adapters)
    llm_api_options.yaml           LLM-API options + the DMS block under the custom key ``x_modelopt_dms``
    llm_api_options.trtllm.yaml    the same options without the custom key (pass this one to TensorRT-LLM)
    dms/dms_config.json            the DMS block (+ dms_adapters.safetensors with strip-adapters)
    bundle.json                    manifest: source, quantization, what TensorRT-LLM does and does not do
    README.md                      how to serve it and what is missing for DMS

TensorRT-LLM has no DMS runtime today: the bundle serves the model with a dense (optionally FP8) KV cache,
and carries everything a DMS runtime needs. See deploy/tensorrt_llm/README.md.

Exit codes: 0 written; 2 bad input (not a DMS export, target exists).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

DMS_YAML_KEY = "x_modelopt_dms"
DMS_BLOCK_KEY = "dms_config"
ADAPTER_TENSOR_TAG = "dms_adapter"
CHECKPOINT_MODES = ("symlink", "copy", "strip-adapters")

YAML_HEADER = """\
# TensorRT-LLM LLM-API options for a modelopt-dms export (PyTorch backend).
# Keys and accepted values change between releases: verify them against the TensorRT-LLM version you deploy.
# `{key}` is NOT a TensorRT-LLM option: it records the DMS settings for a DMS-capable runtime.
# TensorRT-LLM's argument validation may reject unknown keys; pass llm_api_options.trtllm.yaml (same options
# without `{key}`) to trtllm-serve / trtllm-bench / LLM(...).
"""


def read_export(export_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(config.json, hf_quant_config.json['quantization'] or None)`` of a modelopt-dms export."""
    cfg_path = export_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{export_dir} has no config.json: not a Hugging Face export folder.")
    config = json.loads(cfg_path.read_text())
    if not config.get(DMS_BLOCK_KEY):
        raise ValueError(
            f"{cfg_path} has no '{DMS_BLOCK_KEY}' block: not a modelopt-dms export "
            "(write one with modelopt_dms.export_hf_checkpoint)."
        )
    quant_path = export_dir / "hf_quant_config.json"
    quant = None
    if quant_path.is_file():
        raw = json.loads(quant_path.read_text())
        quant = raw.get("quantization", raw)
    return config, quant


def llm_api_options(quant: dict[str, Any] | None) -> dict[str, Any]:
    """TensorRT-LLM LLM-API options implied by the export (FP8 KV cache when it has FP8 k/v scales)."""
    options: dict[str, Any] = {}
    if quant and str(quant.get("kv_cache_quant_algo", "")).upper() == "FP8":
        options["kv_cache_config"] = {"dtype": "fp8"}
    return options


def _dms_yaml_block(config: dict[str, Any], quant: dict[str, Any] | None, mode: str) -> dict[str, Any]:
    block = config[DMS_BLOCK_KEY]
    return {
        "note": "custom modelopt-dms key; TensorRT-LLM does not implement DMS and does not read it",
        "dms_config": block,
        "kv_cache_layout_needed": "per (request, layer, KV head) compact rows with delayed eviction "
        f"(window W = window_size + 1 = {int(block['window_size']) + 1} tokens)",
        "quant_algo": (quant or {}).get("quant_algo"),
        "kv_cache_quant_algo": (quant or {}).get("kv_cache_quant_algo"),
        "checkpoint_mode": mode,
    }


def _write_yaml(path: Path, data: dict[str, Any], header: str) -> None:
    import yaml

    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False) if data else "{}\n"
    path.write_text(header + body)


def _strip_adapters(export_dir: Path, ckpt: Path, dms_dir: Path) -> list[str]:
    """Copy the export without DMS adapter tensors (they go to dms/dms_adapters.safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt.mkdir()
    adapters: dict[str, Any] = {}
    moved: list[str] = []
    for src in sorted(export_dir.iterdir()):
        if src.is_dir():
            shutil.copytree(src, ckpt / src.name)
        elif src.suffix == ".safetensors":
            kept = {}
            with safe_open(str(src), framework="pt") as f:
                meta = f.metadata() or {}
                for name in f.keys():
                    (adapters if ADAPTER_TENSOR_TAG in name else kept)[name] = f.get_tensor(name)
                    if ADAPTER_TENSOR_TAG in name:
                        moved.append(name)
            save_file(kept, str(ckpt / src.name), metadata=meta or {"format": "pt"})
        elif src.name.endswith(".safetensors.index.json"):
            index = json.loads(src.read_text())
            index["weight_map"] = {
                k: v for k, v in index.get("weight_map", {}).items() if ADAPTER_TENSOR_TAG not in k
            }
            (ckpt / src.name).write_text(json.dumps(index, indent=2) + "\n")
        elif src.name == "config.json":
            config = json.loads(src.read_text())
            config.pop(DMS_BLOCK_KEY, None)  # a plain checkpoint: DMS settings live in dms/
            (ckpt / src.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(src, ckpt / src.name)
    if adapters:
        save_file(adapters, str(dms_dir / "dms_adapters.safetensors"), metadata={"format": "pt"})
    return moved


def _readme(config: dict[str, Any], quant: dict[str, Any] | None, mode: str, fp8_kv: bool) -> str:
    block = config[DMS_BLOCK_KEY]
    arch = ", ".join(config.get("architectures", [])) or "?"
    if quant:
        kv = quant.get("kv_cache_quant_algo") or "not quantized"
        quant_line = f"{quant.get('quant_algo')} weights, KV cache {kv}"
    else:
        quant_line = "none (unquantized checkpoint)"
    notes = []
    if mode != "strip-adapters" and block.get("decision") == "adapter":
        notes.append(
            "The checkpoint still holds the DMS adapter tensors (`*.self_attn.dms_adapter.*`). If your\n"
            "TensorRT-LLM version refuses unknown tensors, rebuild the bundle with\n"
            "`--checkpoint-mode strip-adapters` (the adapters then live in `dms/dms_adapters.safetensors`)."
        )
    if block.get("decision") == "borrowed_neuron":
        notes.append(
            "Decision kind `borrowed_neuron`: the model was trained with the last channel of the first\n"
            "query head of each GQA group zeroed (it carries the eviction logit). A runtime without DMS\n"
            "does not zero it, so its outputs differ from the DMS model's even before any eviction."
        )
    fp8 = "FP8 " if fp8_kv else ""
    note_text = "".join(f"{n}\n\n" for n in notes)
    return f"""# TensorRT-LLM serving bundle (modelopt-dms export)

- architecture: {arch}
- quantization: {quant_line}
- DMS: decision `{block.get("decision")}`, window {block.get("window_size")}, granularity \
`{block.get("granularity")}`, layers {block.get("layers")}
- checkpoint mode: `{mode}`

## Serve it today (dense {fp8}KV cache)

TensorRT-LLM's PyTorch backend / LLM API loads the unified checkpoint in `checkpoint/` (including FP8
weights and FP8 KV scales). It does **not** implement DMS: every token stays in the KV cache, so you get the
model's quality and {fp8}KV memory, but no DMS compression.

```bash
trtllm-serve ./checkpoint --backend pytorch --extra_llm_api_options ./llm_api_options.trtllm.yaml
```

```python
import yaml
from tensorrt_llm import LLM
llm = LLM(model="./checkpoint", **yaml.safe_load(open("llm_api_options.trtllm.yaml")))
```

Flag and option names change between releases (e.g. `--extra_llm_api_options` vs `--config`): verify them
against the TensorRT-LLM version you deploy.

{note_text}## What DMS needs from a runtime (not in TensorRT-LLM today)

See `deploy/tensorrt_llm/README.md` in modelopt-dms. In short: evaluate the per-layer decision head
(`x_modelopt_dms.dms_config` in `llm_api_options.yaml`, or `dms/dms_config.json`) in every forward; keep
per (request, layer, KV head) compact rows with delayed eviction (a token flagged by its successor's decision
leaves once `window_size + 1` newer tokens exist), ragged lengths per head or padding to the longest head,
slot reuse, and the pending flag of each row's newest token carried across prefill chunks and turns.
"""


def make_bundle(
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint_mode: str = "symlink",
    overwrite: bool = False,
) -> Path:
    """Write a serving bundle for ``export_dir`` into ``out_dir`` (atomically); returns ``out_dir``.

    Raises:
        ValueError: ``export_dir`` is not a modelopt-dms export, or an unknown ``checkpoint_mode``.
        FileExistsError: ``out_dir`` exists and is not empty (pass ``overwrite=True``).

    """
    if checkpoint_mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint_mode must be one of {CHECKPOINT_MODES}, got {checkpoint_mode!r}")
    export_dir = Path(export_dir).resolve()
    out_dir = Path(out_dir)
    config, quant = read_export(export_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite or choose a new folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the bundle gets normal folder permissions
    try:
        dms_dir = tmp / "dms"
        dms_dir.mkdir()
        ckpt = tmp / "checkpoint"
        moved: list[str] = []
        if checkpoint_mode == "symlink":
            os.symlink(export_dir, ckpt, target_is_directory=True)
        elif checkpoint_mode == "copy":
            shutil.copytree(export_dir, ckpt)
        else:
            moved = _strip_adapters(export_dir, ckpt, dms_dir)
        (dms_dir / "dms_config.json").write_text(
            json.dumps(config[DMS_BLOCK_KEY], indent=2, sort_keys=True) + "\n"
        )
        options = llm_api_options(quant)
        fp8_kv = options.get("kv_cache_config", {}).get("dtype") == "fp8"
        header = YAML_HEADER.format(key=DMS_YAML_KEY)
        custom = {**options, DMS_YAML_KEY: _dms_yaml_block(config, quant, checkpoint_mode)}
        _write_yaml(tmp / "llm_api_options.yaml", custom, header)
        _write_yaml(tmp / "llm_api_options.trtllm.yaml", options, header)
        manifest = {
            "format": "modelopt_dms.trtllm_bundle.v1",
            "source_export": str(export_dir),
            "checkpoint_mode": checkpoint_mode,
            "architectures": config.get("architectures"),
            "quant_algo": (quant or {}).get("quant_algo"),
            "kv_cache_quant_algo": (quant or {}).get("kv_cache_quant_algo"),
            "kv_cache_fp8": fp8_kv,
            "dms_config": config[DMS_BLOCK_KEY],
            "adapter_tensors_moved": moved,
            "tensorrt_llm_dms_support": False,
            "served_kv_cache": "dense (no DMS eviction) until a DMS-capable runtime reads x_modelopt_dms",
        }
        (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(config, quant, checkpoint_mode, fp8_kv))
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old-" + next(tempfile._get_candidate_names()))
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export_dir", help="folder written by modelopt_dms.export_hf_checkpoint")
    parser.add_argument("out_dir", help="bundle folder to write (must be new or empty)")
    parser.add_argument("--checkpoint-mode", choices=CHECKPOINT_MODES, default="symlink")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = make_bundle(args.export_dir, args.out_dir, args.checkpoint_mode, args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"make_bundle: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "bundle.json").read_text())
    print(f"bundle written to {out} (checkpoint: {args.checkpoint_mode}, FP8 KV: {manifest['kv_cache_fp8']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
