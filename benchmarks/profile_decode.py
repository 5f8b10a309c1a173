#!/usr/bin/env python
"""Where one decode step's time goes: kernel launches and the top kernels, DMS vs ``DynamicCache``.

A random-weight Llama-3.1-8B-wide decoder cut to ``--layers`` layers (per-layer costs are what
matter; launches and times scale with the layer count), bf16 on CUDA, prefilled with ``--context``
random tokens; DMS runs ``fixed_eviction`` keep 1 of K with a window of 256. After two warm-up
steps ``--timed`` steps are timed with a sync after each, then ``torch.profiler`` records one step:
CUDA kernels run, kernel-launch calls, aten ops, and the ten kernels/ops with the most self time.
On CPU (a dry run with ``--shape small``) only the aten ops and CPU times are meaningful.

    python benchmarks/profile_decode.py --device cuda --dtype bfloat16      # scripts/gpu_check.sh
    .venv/bin/python benchmarks/profile_decode.py --shape small --context 256 --batches 1 2   # dry run

Writes ``benchmarks/results/cache/profile_decode.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from common import LLAMA_8B_SHAPE, RESULTS, SMALL_SHAPE, environment, log, sync, write_outputs
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import modelopt_dms as dms

SHAPES = {
    "llama-8b": LLAMA_8B_SHAPE,
    "small": SMALL_SHAPE,
}


def build(shape: str, layers: int, max_len: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=max_len, attn_implementation="sdpa"
    )
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    return base, dms.apply_dms(copy.deepcopy(base), {"window_size": 256})


def _self_time(evt, cuda: bool) -> float:
    if cuda:
        return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))
    return float(evt.self_cpu_time_total)


def profile_step(model, cache, ids: torch.Tensor, timed: int) -> dict:
    """Prefill ``ids``, warm up two steps, time ``timed`` steps (median ms), then profile one."""
    device = ids.device
    cuda = device.type == "cuda"
    with torch.inference_mode():
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        for _ in range(2):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits.argmax(-1)
        step_ms = []
        for _ in range(timed):
            sync(device)
            t0 = time.perf_counter()
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits.argmax(-1)
            sync(device)
            step_ms.append(1e3 * (time.perf_counter() - t0))
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits.argmax(-1)
            sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    pool = kernels if cuda else [e for e in events if e.key.startswith("aten::")]
    top = sorted(pool, key=lambda e: _self_time(e, cuda), reverse=True)[:10]
    return {
        "kernels": sum(e.count for e in kernels),
        "kernel_launch_calls": launches,
        "aten_ops": aten,
        "step_ms_median": statistics.median(step_ms),
        "top": [
            {"name": e.key[:90], "count": e.count, "self_us": round(_self_time(e, cuda), 1)} for e in top
        ],
    }


def table(rows: list[dict], layers: int) -> str:
    lines = [
        "| batch | cache | step ms | kernels/step | launch calls | aten ops | kernels/step ÷ layers |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['cache']} | {r['step_ms_median']:.2f} | {r['kernels']} | "
            f"{r['kernel_launch_calls']} | {r['aten_ops']} | {r['kernels'] / layers:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--keep-every", type=int, default=8)
    p.add_argument("--timed", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=RESULTS / "cache" / "profile_decode.json")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment()
    log(f"{env['command']}\n{env['torch']}")
    base, model = build(args.shape, args.layers, args.context + 64, device, dtype)
    vocab = base.config.vocab_size
    rows = []
    with dms.fixed_eviction(model, keep_every=args.keep_every):
        for bsz in args.batches:
            ids = torch.randint(3, vocab, (bsz, args.context), device=device)
            for kind, m, cache in (
                ("dynamic", base, DynamicCache()),
                ("dms", model, dms.DMSCache(block_size=256, prefill_chunk_size=1024)),
            ):
                r = {"batch": bsz, "cache": kind, **profile_step(m, cache, ids, args.timed)}
                rows.append(r)
                log(
                    f"b{bsz} {kind}: {r['step_ms_median']:.2f} ms, {r['kernels']} kernels, "
                    f"{r['kernel_launch_calls']} launch calls, {r['aten_ops']} aten ops"
                )
                for t in r["top"]:
                    log(f"    {t['self_us']:10.1f} us  x{t['count']:4d}  {t['name']}")
                del cache
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    md = table(rows, args.layers)
    log("\n" + md)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    text = (
        f"# One decode step profiled: {args.shape} width, {args.layers} layers, {args.dtype} {args.device}, "
        f"context {args.context}, DMS keep 1/{args.keep_every} window 256\n\n- command: `{env['command']}`\n"
        f"- torch {env['torch']}\n\n{md}\n"
    )
    paths = write_outputs(
        args.out.parent, args.out.stem, {"environment": env, "settings": settings, "rows": rows}, text
    )
    log("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
