#!/usr/bin/env python
"""DMS compact cache vs transformers' DynamicCache and StaticCache, interleaved in one process.

For every (batch, context) the unconverted model runs with a ``DynamicCache`` and a ``StaticCache``
and a DMS copy of it (``apply_dms`` + ``fixed_eviction`` keep 1 of K + ``DMSCache``), one after
the other, on the same real English text (held-out python3-doc files; every row of a batch starts
at another offset). Measured per run:

* prefill tokens/s: one forward of the whole batch of contexts (``logits_to_keep=1``, as generate);
* decode tokens/s: greedy steps feeding back the argmax (batch x steps / time of the model calls);
* ops per decode step: aten ops dispatched by one step (a ``TorchDispatchMode`` counter);
* KV bytes: allocated vs kept vs dense (``cache_stats`` for DMS; tensor bytes for the dense caches).

``--graphs`` adds a fourth run per cell, ``dms-graph``: the same DMS model decoding through
``dms.GraphDecoder`` (each step replayed from a CUDA graph; on CPU it runs eagerly). Its first decode
step warms up and captures the graph: ``first_step_ms`` reports it, the median step leaves it out.

    .venv/bin/python benchmarks/bench_cache.py                             # the README table
    .venv/bin/python benchmarks/bench_cache.py --contexts 512 --batches 1 2 --decode-tokens 4
    .venv/bin/python benchmarks/bench_cache.py --model tiny-llama-8b-shape --device cuda --dtype bfloat16
    python3 benchmarks/bench_cache.py --model tiny-llama-8b-shape --device cuda --dtype bfloat16 --graphs

Results: ``benchmarks/results/cache/<stem>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    LLAMA_8B_SHAPE,
    MIB,
    RESULTS,
    SMALL_SHAPE,
    dense_cache_bytes,
    environment,
    log,
    real_text_ids,
    sync,
    write_outputs,
)
from torch.utils._python_dispatch import TorchDispatchMode

import modelopt_dms as dms

CACHES = ("dynamic", "static", "dms")
RANDOM_SHAPES = {
    "tiny-llama-8b-shape": (LLAMA_8B_SHAPE, 32),
    "tiny-random": (SMALL_SHAPE, 2),
}
GRAPH = "dms-graph"  # the DMS cache decoded through GraphDecoder (--graphs)
TARGET_BYTES = 1.1  # allocated <= 1.1 x kept at >= 1K context
TARGET_DECODE = 1.0  # decode >= 1.0 x the faster dense cache everywhere ...
TARGET_DECODE_8K_B4 = 1.5  # ... and >= 1.5 x at 8K, batch 4
TARGET_PREFILL = 1.0


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.count += 1
        return func(*args, **(kwargs or {}))


def new_cache(kind: str, model, max_len: int, args):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache()
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    # dms, dms-graph
    return dms.DMSCache(block_size=args.block_size, prefill_chunk_size=args.chunk or None)


def cache_bytes(kind: str, cache) -> dict:
    if kind.startswith("dms"):
        st = dms.cache_stats(cache)
        return {
            "kv_bytes_allocated": st["kv_bytes_allocated"],
            "kv_bytes_kept": st["kv_bytes_kept"],
            "kv_bytes_dense": st["kv_bytes_dense"],
            "compression_ratio": st["compression_ratio"],
        }
    b = dense_cache_bytes(cache)
    return {"kv_bytes_allocated": b, "kv_bytes_kept": b, "kv_bytes_dense": b, "compression_ratio": 1.0}


def stepper(model, kind: str, cache, args):
    """One greedy decode step ``tok (B, 1) -> next tok (B, 1)`` on ``cache``."""
    if kind == GRAPH:
        decoder = dms.GraphDecoder(model, cache, reserve=args.graph_reserve)
        return lambda tok: decoder.step(tok)[:, -1].argmax(-1, keepdim=True)

    def step(tok):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    return step


def run_once(model, kind: str, ids: torch.Tensor, decode_tokens: int, args) -> dict:
    """Prefill ``ids`` (B, T), then greedy-decode; timings, op count and cache accounting."""
    device = ids.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = new_cache(kind, model, ids.shape[1] + decode_tokens + 1, args)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        t_prefill = time.perf_counter() - t0
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        decode_step = stepper(model, kind, cache, args)
        step_s, ops, first_s = [], None, None
        for i in range(decode_tokens):
            if i == 1:  # count the ops of one steady-state step
                counter = OpCounter()
                with counter:
                    tok = decode_step(tok)
                ops = counter.count
                continue
            sync(device)
            t0 = time.perf_counter()
            tok = decode_step(tok)
            sync(device)
            if i == 0:  # a GraphDecoder warms up and captures here
                first_s = time.perf_counter() - t0
            else:
                step_s.append(time.perf_counter() - t0)
    bsz = ids.shape[0]
    res = {
        "prefill_s": t_prefill,
        "prefill_tok_s": ids.numel() / t_prefill,
        "decode_step_ms_median": 1e3 * statistics.median(step_s),
        "decode_tok_s": bsz / statistics.median(step_s),
        "ops_per_decode_step": ops,
        "first_step_ms": 1e3 * first_s,
        **cache_bytes(kind, cache),
    }
    if device.type == "cuda":
        res["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    del cache
    gc.collect()
    return res


def median_run(runs: list[dict]) -> dict:
    """One record of repeated runs: the medians of the timings, the rest from the first run."""
    out = dict(runs[0])
    for key in ("prefill_s", "prefill_tok_s", "decode_step_ms_median", "decode_tok_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def load(args):
    """(base model, tokenizer or None) on the requested device and dtype."""
    dtype = getattr(torch, args.dtype)
    if args.model in RANDOM_SHAPES:  # random weights (the GPU check; a CPU dry run of the script)
        from transformers import LlamaConfig, LlamaForCausalLM

        shape, layers = RANDOM_SHAPES[args.model]
        cfg = LlamaConfig(
            **shape, num_hidden_layers=layers, max_position_embeddings=16384, attn_implementation="sdpa"
        )
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(dtype)
        return model.eval(), None
    model, tok = dms.load_model(args.model, dtype=dtype)
    return model.to(args.device).eval(), tok


def make_table(rows: list[dict]) -> str:
    head = (
        "| batch | context | cache | prefill tok/s | decode tok/s | ops/step | KV MiB alloc | KV MiB kept | "
        "CR | decode vs best dense | prefill vs best dense | alloc/kept |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        for kind in (*CACHES, GRAPH):
            if kind not in r:
                continue
            m = r[kind]
            rel = "| |"
            if kind.startswith("dms"):
                speedup = r["decode_speedup" if kind == "dms" else "decode_speedup_graph"]
                rel = f"{speedup:.2f} | {r['prefill_ratio']:.2f} | {_alloc_ratio(r, kind):.3f}"
            cells = [
                r["batch"],
                r["context"],
                kind,
                f"{m['prefill_tok_s']:,.0f}",
                f"{m['decode_tok_s']:,.1f}",
                m["ops_per_decode_step"],
                f"{m['kv_bytes_allocated'] / MIB:,.1f}",
                f"{m['kv_bytes_kept'] / MIB:,.1f}",
                f"{m['compression_ratio']:.2f}",
                rel,
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _alloc_ratio(row: dict, kind: str = "dms") -> float:
    return row[kind]["kv_bytes_allocated"] / row[kind]["kv_bytes_kept"]


def check_targets(rows: list[dict]) -> list[dict]:
    out = [
        {
            "target": f"decode >= {TARGET_DECODE}x the faster dense cache (every batch, context)",
            "pass": all(r["decode_speedup"] >= TARGET_DECODE for r in rows),
            "detail": ", ".join(f"b{r['batch']}/{r['context']}: {r['decode_speedup']:.2f}" for r in rows),
        },
        {
            "target": f"prefill >= {TARGET_PREFILL}x the faster dense cache (every batch, context)",
            "pass": all(r["prefill_ratio"] >= TARGET_PREFILL for r in rows),
            "detail": ", ".join(f"b{r['batch']}/{r['context']}: {r['prefill_ratio']:.2f}" for r in rows),
        },
        {
            "target": f"KV allocated <= {TARGET_BYTES}x kept at >= 1K context",
            "pass": all(_alloc_ratio(r) <= TARGET_BYTES for r in rows if r["context"] >= 1024),
            "detail": ", ".join(f"b{r['batch']}/{r['context']}: {_alloc_ratio(r):.3f}" for r in rows),
        },
    ]
    if rows and "decode_speedup_graph" in rows[0]:
        out.append(
            {
                "target": f"decode through GraphDecoder >= {TARGET_DECODE}x the faster dense cache",
                "pass": all(r["decode_speedup_graph"] >= TARGET_DECODE for r in rows),
                "detail": ", ".join(
                    f"b{r['batch']}/{r['context']}: {r['decode_speedup_graph']:.2f}" for r in rows
                ),
            }
        )
    big = [r for r in rows if r["batch"] == 4 and r["requested"] == 8192]
    if big:
        out.append(
            {
                "target": f"decode >= {TARGET_DECODE_8K_B4}x the faster dense cache at 8K, batch 4",
                "pass": big[0]["decode_speedup"] >= TARGET_DECODE_8K_B4,
                "detail": f"{big[0]['decode_speedup']:.2f}",
            }
        )
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in batches:
        sub = [r for r in rows if r["batch"] == b]
        ctx = [r["context"] for r in sub]
        axes[0].plot(ctx, [r["decode_speedup"] for r in sub], "o-", label=f"batch {b}")
        axes[1].plot(ctx, [r["dms"]["kv_bytes_allocated"] / MIB for r in sub], "s-", label=f"DMS, batch {b}")
        axes[1].plot(
            ctx, [r["dynamic"]["kv_bytes_allocated"] / MIB for r in sub], "x--", label=f"dense, batch {b}"
        )
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(
        xscale="log", xlabel="context tokens", ylabel="DMS decode / faster dense cache", title="Decode"
    )
    axes[1].set(
        xscale="log", yscale="log", xlabel="context tokens", ylabel="KV MiB allocated", title="KV cache"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="a load_model name/path, or tiny-llama-8b-shape / tiny-random (random weights)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--keep-every", type=int, default=8, help="fixed eviction: keep 1 of K outside the window")
    p.add_argument("--chunk", type=int, default=256, help="DMSCache prefill_chunk_size (0 = one piece)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--graphs", action="store_true", help="also decode DMS through GraphDecoder (CUDA graphs)")
    p.add_argument("--graph-reserve", type=int, default=64, help="GraphDecoder reserve (steps per graph)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell (medians reported)")
    p.add_argument("--out", type=Path, default=RESULTS / "cache" / "cache_bench.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment()
    log(f"{env['command']}\n{env['torch']}, {env['threads']} threads, {env['cpu_model']}")
    base, tok = load(args)
    model_dms = dms.apply_dms(copy.deepcopy(base), {"window_size": args.window})
    max_pos = int(base.config.max_position_embeddings)
    need = max(args.batches) * (max(args.contexts) + 1)
    if tok is not None:
        text = real_text_ids(tok, need)[0].to(args.device)
    else:  # random-weight model: random ids
        text = torch.randint(0, base.config.vocab_size, (need,), device=args.device)
    rows = []
    with dms.fixed_eviction(model_dms, keep_every=args.keep_every):
        runs_of = [("dynamic", base), ("static", base), ("dms", model_dms)]
        kinds = CACHES + ((GRAPH,) if args.graphs else ())
        if args.graphs:
            runs_of.append((GRAPH, model_dms))
        for kind, model in runs_of:  # warm-up
            run_once(model, kind, text[None, :128], 3, args)
        for bsz in args.batches:
            for requested in args.contexts:
                ctx = min(requested, max_pos - args.decode_tokens - 1)
                ids = torch.stack([text[i * ctx : (i + 1) * ctx] for i in range(bsz)])
                row = {"batch": bsz, "requested": requested, "context": ctx}
                runs: dict[str, list[dict]] = {k: [] for k in kinds}
                for _ in range(args.repeats):  # interleaved: dynamic, static, dms, dynamic, ...
                    for kind, model in runs_of:
                        runs[kind].append(run_once(model, kind, ids, args.decode_tokens, args))
                for kind in kinds:
                    row[kind] = median_run(runs[kind])
                    m = row[kind]
                    log(
                        f"b{bsz:3d} ctx {ctx:5d} {kind:7s}: prefill {m['prefill_tok_s']:9.1f} tok/s, decode "
                        f"{m['decode_tok_s']:8.2f} tok/s, {m['ops_per_decode_step']} ops/step, "
                        f"KV {m['kv_bytes_allocated'] / MIB:8.1f} MiB, CR {m['compression_ratio']:.2f}"
                    )
                best_decode = max(row["dynamic"]["decode_tok_s"], row["static"]["decode_tok_s"])
                best_prefill = max(row["dynamic"]["prefill_tok_s"], row["static"]["prefill_tok_s"])
                row["decode_speedup"] = row["dms"]["decode_tok_s"] / best_decode
                row["prefill_ratio"] = row["dms"]["prefill_tok_s"] / best_prefill
                if args.graphs:
                    row["decode_speedup_graph"] = row[GRAPH]["decode_tok_s"] / best_decode
                rows.append(row)
                log("row " + json.dumps(row))  # in the log too, should a later cell be cut off
    table = make_table(rows)
    targets = check_targets(rows)
    lines = [f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}" for t in targets]
    log("\n" + table + "\n\n" + "\n".join(lines))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    title = (
        f"{args.model} {args.dtype} {args.device}: DMS w={args.window} keep 1/{args.keep_every} "
        "vs the faster of DynamicCache/StaticCache"
    )
    md = (
        f"# {title}\n\n- command: `{env['command']}`\n- torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['threads']} threads, {env['cpu_model']}\n"
        f"- {args.repeats} interleaved runs per cell (dynamic, static, DMS in turn), medians; a run's decode "
        f"speed is the median of its {args.decode_tokens - 2} timed greedy steps (the first step and "
        f"the op-counted one are left out)\n\n{table}\n\n## Targets\n\n"
        + "\n".join(f"- {line}" for line in lines)
        + "\n"
    )
    payload = {"environment": env, "settings": settings, "rows": rows, "targets": targets}
    paths = write_outputs(args.out.parent, args.out.stem, payload, md, lambda png: plot(rows, png, title))
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
