#!/usr/bin/env python
"""Trainer throughput and peak GPU memory on CUDA: the eager soft-bias kernel with full logits vs
the flex-attention kernel with the fused lm_head + KL (and with gradient checkpointing), side by side.

A random-weight decoder of a real model's shape (default SmolLM2-135M: 30 layers, 9 query / 3 KV
heads, vocab 49152) in bf16 with fp32 adapters; random token ids; batch 1; each (length, variant)
trains ``--steps`` steps from the same seed, in one process (``max_memory_allocated`` is reset per
run). A run that runs out of memory is recorded as OOM. Prints a table and writes
``benchmarks/results/train_gpu/train_gpu_bench.{json,md}``.

    python benchmarks/bench_train_gpu.py                          # scripts/gpu_check.sh runs this
    python benchmarks/bench_train_gpu.py --seqs 1024 --steps 4    # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import MIB, RESULTS, environment, log, write_outputs

import modelopt_dms as dms
from modelopt_dms.training import TrainConfig, train

VARIANTS = {
    "eager+full-logits": {"attention": "eager", "fused_kl": False},
    "flex+fused-kl": {"attention": "flex", "fused_kl": True},
    "flex+fused-kl+ckpt": {"attention": "flex", "fused_kl": True, "gradient_checkpointing": True},
}
SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}


def build(shape: str, max_len: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_len, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return dms.apply_dms(model, {"window_size": 256, "target_compression_ratio": 8.0})


def run(shape: str, seq: int, variant: str, steps: int, device, dtype) -> dict:
    model = build(shape, seq, device, dtype)
    ids = torch.randint(3, model.config.vocab_size, (steps, seq), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(
        steps=steps,
        lr=5e-5,
        checkpoint_every=0,
        anneal_steps=steps,
        autocast_bf16=dtype == torch.bfloat16,
        **VARIANTS[variant],
    )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = {"seq": seq, "variant": variant}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            hist = train(model, ids, cfg, str(Path(tmp) / "run"), progress=False)
            if cuda:
                torch.cuda.synchronize()
            out["seconds"] = time.perf_counter() - t0
        timed = hist[2:] or hist  # the first steps compile the flex kernels
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        out["peak_mib"] = torch.cuda.max_memory_allocated() / MIB if cuda else float("nan")
        out["final_loss"] = hist[-1]["loss"]
        out["finite"] = all(r["loss"] == r["loss"] for r in hist)
    except torch.OutOfMemoryError:
        out["oom"] = True
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def table(rows: list[dict]) -> str:
    lines = ["| seq | variant | tokens/s | peak GPU MiB | vs eager | final loss |", "|---" * 6 + "|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['seq']} | {r['variant']} | OOM | OOM | | |")
            continue
        base = next((b for b in rows if b["seq"] == r["seq"] and b["variant"] == "eager+full-logits"), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and not base.get("oom") else "-"
        lines.append(
            f"| {r['seq']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} | {ratio} | "
            f"{r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", help="cuda; cpu only dry-runs the script (eager variant)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS / "train_gpu" / "train_gpu_bench.json")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu.py needs a CUDA GPU (bench_train.py measures the CPU trainer)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    env = environment()
    log(f"{env['command']}\n{env['torch']}, {name}")
    rows = []
    for seq in args.seqs:
        for variant in args.variants:
            rows.append(run(args.shape, seq, variant, args.steps, device, dtype))
            log(str(rows[-1]))
    md = table(rows)
    log("\n" + md)
    title = f"# Trainer on {name}: {args.shape} shape, random weights, {args.dtype}"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"environment": env, "settings": settings, "rows": rows}
    text = f"{title}\n\n- command: `{env['command']}`\n- torch {env['torch']}\n\n{md}\n"
    paths = write_outputs(args.out.parent, args.out.stem, payload, text)
    log("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
