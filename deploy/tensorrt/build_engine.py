#!/usr/bin/env python3
r"""Build a TensorRT engine from the modelopt-dms ONNX step graph (``modelopt_dms.export.onnx.export_onnx``).

The graph has three kinds of dynamic axes: ``batch`` (B), ``new_tokens`` (T, 1 for decode, the chunk size
for prefill) and one ``past_len_<l>`` (L) per layer (the padded compact cache). One optimisation profile
covers them all: ``min``/``opt``/``max`` per axis from the command line, defaulting to the ``profile_*``
metadata written at export time.

Needs the ``tensorrt`` Python package and an NVIDIA GPU. Without them it exits with code 2 and says what is
missing; it never writes a placeholder engine. Exit codes: 0 engine written, 1 parse/build failure,
2 missing TensorRT / GPU / input file.

Example::

    python deploy/tensorrt/build_engine.py out/smollm2_dms.onnx --engine out/smollm2_dms.plan --fp16 \\
        --max-batch 4 --opt-new-tokens 1 --max-new-tokens 512 --max-past 8192
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MISSING_TRT = """\
build_engine: the `tensorrt` Python package is not importable here ({err}).
Nothing was built. Run this script where TensorRT (8.6 or 10.x) and an NVIDIA GPU are available, e.g. an
NGC TensorRT container:
    docker run --gpus all -v $PWD:/w -w /w nvcr.io/nvidia/tensorrt:<release>-py3 \\
        python deploy/tensorrt/build_engine.py <model.onnx> --engine <model.plan>
or `pip install tensorrt` on a CUDA machine. The ONNX file itself runs anywhere with onnxruntime
(modelopt_dms.export.onnx_runtime.OnnxDMSGenerator)."""

MISSING_GPU = """\
build_engine: TensorRT is installed but no usable NVIDIA GPU / CUDA driver was found ({err}).
Nothing was built. TensorRT builds engines on the GPU they will run on: run this script on that machine."""


def _fail(msg: str, code: int = 2) -> int:
    print(msg, file=sys.stderr)
    return code


def _read_profile_defaults(onnx_path: Path) -> dict[str, int]:
    """``profile_*`` metadata of the exported file (empty when ``onnx`` is not installed)."""
    try:
        import onnx
    except ImportError:
        return {}
    proto = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for prop in proto.metadata_props:
        if prop.key.startswith("profile_"):
            out[prop.key[len("profile_") :]] = int(prop.value)
    return out


def axis_ranges(args: argparse.Namespace, defaults: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """``(min, opt, max)`` of the three axis kinds."""
    max_b = args.max_batch or defaults.get("max_batch", 8)
    max_t = args.max_new_tokens or defaults.get("max_new_tokens", 512)
    max_l = args.max_past or defaults.get("max_past", 4096)
    ranges = {
        "batch": (1, min(args.opt_batch or 1, max_b), max_b),
        "new_tokens": (1, min(args.opt_new_tokens or 1, max_t), max_t),
        "past": (args.min_past, min(args.opt_past or max_l // 2, max_l), max_l),
    }
    for name, (lo, opt, hi) in ranges.items():
        if not lo <= opt <= hi:
            raise ValueError(f"profile for {name}: need min <= opt <= max, got {lo}, {opt}, {hi}")
    return ranges


def profile_shape(name: str, shape: tuple[int, ...], ranges: dict) -> tuple[tuple[int, ...], ...]:
    """``(min, opt, max)`` shapes of one network input; -1 dims are the dynamic axes."""
    if name in ("input_ids", "position_ids"):
        kinds = ["batch", "new_tokens"]
    elif re.fullmatch(r"past_(key|value|pos|flag|valid|last)_\d+", name):
        kinds = ["batch", None, "past", None][: len(shape)]
    else:
        raise ValueError(f"unexpected network input {name!r}: not a modelopt-dms ONNX step graph")
    dims = []
    for i, d in enumerate(shape):
        if d >= 0:
            dims.append((d, d, d))
        elif i < len(kinds) and kinds[i] is not None:
            dims.append(ranges[kinds[i]])
        else:
            raise ValueError(f"input {name!r} has an unexpected dynamic axis {i}")
    return tuple(tuple(x[k] for x in dims) for k in range(3))


def build(args: argparse.Namespace) -> int:
    """Parse the ONNX file, set one optimisation profile, build and write the engine."""
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        return _fail(f"build_engine: {onnx_path} does not exist.")
    try:
        import tensorrt as trt
    except ImportError as err:
        return _fail(MISSING_TRT.format(err=err))
    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
        if builder is None:
            raise RuntimeError("trt.Builder returned None")
    except Exception as err:  # noqa: BLE001 - TensorRT raises various errors without a device
        return _fail(MISSING_GPU.format(err=err))

    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # follows external data beside the file
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        return _fail(f"build_engine: TensorRT could not parse {onnx_path}:\n{errors}", 1)

    ranges = axis_ranges(args, _read_profile_defaults(onnx_path))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_gb * (1 << 30)))
    if args.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if args.bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        lo, opt, hi = profile_shape(tensor.name, tuple(tensor.shape), ranges)
        profile.set_shape(tensor.name, lo, opt, hi)
        if args.verbose:
            print(f"profile {tensor.name}: min {lo} opt {opt} max {hi}")
    config.add_optimization_profile(profile)
    print(
        f"building engine (TensorRT {trt.__version__}): batch {ranges['batch']}, "
        f"new_tokens {ranges['new_tokens']}, past {ranges['past']} ..."
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return _fail("build_engine: TensorRT failed to build the engine (see the log above).", 1)
    engine_path = Path(args.engine)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    print(f"engine written to {engine_path} ({engine_path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", help="ONNX step graph from modelopt_dms.export.onnx.export_onnx")
    p.add_argument("--engine", required=True, help="output engine (plan) file")
    p.add_argument("--max-batch", type=int, default=None, help="default: the file's profile_max_batch")
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None, help="largest prefill chunk T")
    p.add_argument("--opt-new-tokens", type=int, default=1, help="1 tunes for decode")
    p.add_argument("--min-past", type=int, default=0, help="0 admits the empty cache of the first prefill")
    p.add_argument("--opt-past", type=int, default=None, help="default: max_past / 2")
    p.add_argument("--max-past", type=int, default=None, help="largest padded compact row L")
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels (the graph itself is FP32)")
    p.add_argument("--bf16", action="store_true", help="allow BF16 kernels (TensorRT >= 9)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        return build(args)
    except ValueError as err:
        return _fail(f"build_engine: {err}")


if __name__ == "__main__":
    sys.exit(main())
