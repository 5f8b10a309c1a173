#!/usr/bin/env python
"""Trainer speed and memory on SmolLM2-135M (2 CPU threads): before vs after, interleaved.

Variants (each step: teacher + student forward, backward, optimizer; batch 1; adapters only):

* ``before``: the previous trainer path: eager attention (``T x T`` soft bias and softmax), full
  teacher and student logits, chunked KL, no cache;
* ``fused``: lm_head + log-softmax + KL fused and chunked (logits memory O(chunk x V));
* ``sdpa``: fused + the training attention in fused SDPA blocks (the CPU default);
* ``after``: sdpa + teacher top-64 cache (warm: filled by a first epoch, not timed) + KL beyond
  the window.

Every (variant, sequence length) runs in its own process, so its peak RSS is its own; variants
alternate per length. Prints a table and writes ``benchmarks/results/train/train_bench.{json,md,png}``.

    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_train.py --seqs 256 --steps 2     # quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, environment, log, write_outputs

VARIANTS = {
    "before": {"attention": "eager", "fused_kl": False, "teacher_cache": False, "kl_beyond_window": False},
    "fused": {"attention": "eager", "fused_kl": True, "teacher_cache": False, "kl_beyond_window": False},
    "sdpa": {"attention": "sdpa", "fused_kl": True, "teacher_cache": False, "kl_beyond_window": False},
    "after": {"attention": "sdpa", "fused_kl": True, "teacher_cache": True, "kl_beyond_window": True},
}


def worker(seq: int, variant: str, steps: int, threads: int) -> dict:
    """One process: load, train ``steps`` timed steps, report tokens/s and peak RSS."""
    import torch

    import modelopt_dms as dms
    from modelopt_dms.corpus import DEFAULT_CACHE_DIR, PYTHON_DOCS_GLOB, build_token_sequences
    from modelopt_dms.training import TrainConfig, train
    from modelopt_dms.training.teacher_cache import TeacherCache

    torch.set_num_threads(threads)
    model, tok = dms.load_model("smollm2-135m")
    model = dms.apply_dms(model, {"window_size": 64, "target_compression_ratio": 4.0})
    rows = build_token_sequences(
        tok, PYTHON_DOCS_GLOB, seq, "train", max_sequences=steps, cache_dir=DEFAULT_CACHE_DIR
    )
    opts = VARIANTS[variant]
    cache = None
    with tempfile.TemporaryDirectory() as tmp:
        if opts["teacher_cache"]:
            cache = TeacherCache(Path(tmp) / "teacher", k=64)
            warm = TrainConfig(steps=rows.shape[0], lr=5e-5, checkpoint_every=0, teacher_cache=True)
            train(model, rows, warm, str(Path(tmp) / "warm"), progress=False, teacher_cache=cache)  # epoch 1
        cfg = TrainConfig(
            steps=rows.shape[0],
            lr=5e-5,
            checkpoint_every=0,
            attention=opts["attention"],
            fused_kl=opts["fused_kl"],
            kl_beyond_window=opts["kl_beyond_window"],
            teacher_cache=opts["teacher_cache"],
        )
        t0 = time.time()  # timed: every teacher from the cache (a second epoch)
        timed = train(model, rows, cfg, str(Path(tmp) / "run"), progress=False, teacher_cache=cache)
        elapsed = time.time() - t0
    return {
        "seq": seq,
        "variant": variant,
        "steps": len(timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "seconds": round(elapsed, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kl": [r["kl"] for r in timed],
        "cache_hits": cache.hits if cache else None,
    }


def _summary(rows: list[dict]) -> list[dict]:
    """One row per (seq, variant): median tokens/s over its processes, the largest peak RSS."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["seq"], r["variant"]), []).append(r)
    return [
        {
            "seq": seq,
            "variant": variant,
            "processes": len(rs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "tokens_per_s_each": [r["tokens_per_s"] for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "kl": statistics.mean(k for r in rs for k in r["kl"]),
        }
        for (seq, variant), rs in groups.items()
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--steps", type=int, default=4, help="timed steps per (variant, length)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=1, help="processes per (variant, length), interleaved")
    p.add_argument("--worker", nargs=2, metavar=("SEQ", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "train" / "train_bench.json")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.steps, args.threads)), flush=True)
        return 0
    env = environment()
    rows = []
    for seq, rnd, variant in itertools.product(args.seqs, range(args.rounds), args.variants):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            str(seq),
            variant,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rec = {**json.loads(proc.stdout.strip().splitlines()[-1]), "round": rnd}
        rows.append(rec)
        speed, peak = rec["tokens_per_s"], rec["peak_rss_mib"]
        log(f"seq {seq:5d} {variant:6s} round {rnd}: {speed:8.1f} tok/s, peak RSS {peak:.0f} MiB")
    summary = _summary(rows)
    by = {(r["seq"], r["variant"]): r for r in summary}
    lines = [
        "| seq | variant | tokens/s (median of processes) | x before | peak RSS MiB | KL (timed steps) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        base = by.get((r["seq"], "before"))
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        cells = [r["seq"], r["variant"], f"{r['tokens_per_s']:.1f}", f"{speed:.2f}"]
        cells.append(f"{r['peak_rss_mib']:.0f}")
        lines.append("| " + " | ".join(map(str, cells)) + f" | {r['kl']:.4f} |")
    table = "\n".join(lines)
    log("\n" + table)
    head = f"# Trainer speed and memory, SmolLM2-135M, {env['threads']} threads"
    md = f"{head}\n\n- command: `{env['command']}`\n\n{table}\n"

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for v in args.variants:
            sub = [r for r in summary if r["variant"] == v]
            axes[0].plot([r["seq"] for r in sub], [r["tokens_per_s"] for r in sub], "o-", label=v)
            axes[1].plot([r["seq"] for r in sub], [r["peak_rss_mib"] for r in sub], "s-", label=v)
        axes[0].set(xlabel="sequence length", ylabel="tokens/s", title="training speed")
        axes[1].set(xlabel="sequence length", ylabel="peak RSS MiB", title="memory")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    data = {"environment": env, "rows": rows, "summary": summary}
    paths = write_outputs(args.out.parent, args.out.stem, data, md, plot)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
