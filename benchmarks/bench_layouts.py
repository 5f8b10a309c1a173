"""KV bytes of the two DMSCache layouts under trained decisions (ragged per-head lengths).

``bench_cache.py`` measures speed with a fixed keep-1-of-k pattern, where every (row, KV head) keeps
the same count and the blocked layout wastes nothing. Trained heads keep very different counts per
head, so a layout sized to the longest row per layer (``blocked``) holds far more than is kept,
while the ``paged`` layout wastes at most part of a page per (row, head). For each context, layout
and page size: one prefill of held-out text (batch 1) with the trained heads, then ``--decode``
greedy steps; allocated vs kept bytes after each, and the decode speed (median step). Example:

    .venv/bin/python benchmarks/bench_layouts.py --adapters artifacts/smollm2_135m_dms_cr8 \
        --contexts 2048 4096 --out benchmarks/results/cache/layouts_cr8.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import MIB, RESULTS, command_line, environment, log, write_outputs

import modelopt_dms as dms
from modelopt_dms.corpus import DEFAULT_CACHE_DIR, build_token_sequences


def _bytes(cache) -> dict:
    stats = dms.cache_stats(cache)
    alloc, kept = stats["kv_bytes_allocated"], stats["kv_bytes_kept"]
    return {
        "compression_ratio": round(float(stats["compression_ratio"]), 3),
        "alloc_mib": round(alloc / MIB, 3),
        "kept_mib": round(kept / MIB, 3),
        "dense_mib": round(stats["kv_bytes_dense"] / MIB, 3),
        "alloc_over_kept": round(alloc / kept, 4),
    }


def measure(model, ids: torch.Tensor, layout: str, page_size: int, decode: int) -> dict:
    """Prefill ``ids`` into a fresh cache, then ``decode`` greedy steps; bytes after each."""
    cache = dms.DMSCache(layout=layout, page_size=page_size)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        after_prefill = _bytes(cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        steps = []
        for _ in range(decode):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t0)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return {
        "layout": layout,
        "page_size": page_size if layout == "paged" else None,
        "prefill_tok_s": round(ids.shape[1] / prefill_s, 1),
        "decode_tok_s": round(1.0 / statistics.median(steps), 2) if steps else None,
        "after_prefill": after_prefill,
        "after_decode": _bytes(cache),
    }


def render(rows: list[dict], command: str, decode: int) -> str:
    head = (
        "| context | layout | page | CR | KV MiB kept | alloc after prefill | alloc / kept | "
        f"alloc / kept after {decode} decode steps | × fewer bytes than dense | prefill tok/s | "
        "decode tok/s |"
    )
    lines = [f"Command: `{command}`", "", head, "|" + "---|" * 11]
    for r in rows:
        p, d = r["after_prefill"], r["after_decode"]
        lines.append(
            f"| {r['context']} | {r['layout']} | {r['page_size'] or '-'} | {p['compression_ratio']:.2f} | "
            f"{p['kept_mib']:.2f} | {p['alloc_mib']:.2f} | {p['alloc_over_kept']:.3f} | "
            f"{d['alloc_over_kept']:.3f} | {p['dense_mib'] / p['alloc_mib']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", default="artifacts/smollm2_135m_dms_cr8")
    p.add_argument("--source", default="python-docs", help="held-out text source")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--page-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--decode", type=int, default=16, help="greedy decode steps after the prefill")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "cache" / "layouts.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tok = dms.load_model(args.model)
    model = dms.load_adapters(base, args.adapters).eval()
    rows = []
    for ctx in args.contexts:
        ids = build_token_sequences(
            tok, args.source, ctx, "heldout", max_sequences=1, cache_dir=DEFAULT_CACHE_DIR
        )[:1]
        for layout, page in [("blocked", 64), *[("paged", s) for s in args.page_sizes]]:
            row = {"context": ctx, **measure(model, ids, layout, page, args.decode)}
            before, after = row["after_prefill"], row["after_decode"]
            log(
                f"ctx {ctx} {layout} {row['page_size'] or ''}: alloc/kept "
                f"{before['alloc_over_kept']:.3f} -> {after['alloc_over_kept']:.3f}, "
                f"decode {row['decode_tok_s']} tok/s"
            )
            rows.append(row)
    command = command_line()
    payload = {
        "command": command,
        "environment": environment(),
        "adapters": args.adapters,
        "source": args.source,
        "rows": rows,
    }
    md = render(rows, command, args.decode)
    print(md)
    for path in write_outputs(args.out.parent, args.out.stem, payload, md):
        log(f"-> {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
