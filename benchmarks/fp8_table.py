"""KV bytes and quality of dense, FP8 KV, DMS and DMS + FP8 KV on SmolLM2-135M (trained heads).

For each held-out text window (real text the heads never saw) and each method, the model runs the
text through its cache (dense = DMS model with eviction disabled) and is compared with the
uncompressed fp32 model: KL(dense ‖ method) per token and teacher-forced argmax agreement. Bytes
are the cache's allocated KV bytes, compared with a dense bf16 and a dense fp32 cache of the same
tokens. Prints a markdown table and writes JSON and a PNG. Example:

    .venv/bin/python benchmarks/fp8_table.py --adapters artifacts/smollm2_135m_dms_cr8 --contexts 2048 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import modelopt_dms as dms
from modelopt_dms.corpus import DEFAULT_CACHE_DIR, PYTHON_DOCS_GLOB, build_token_sequences
from modelopt_dms.evaluation.metrics import kl_per_token, top1_agreement


def log(msg: str) -> None:
    print(msg, flush=True)


@torch.inference_mode()
def run_method(model, ids, disabled: bool):
    cache = dms.DMSCache()
    if disabled:
        with dms.eviction_disabled(model):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    else:
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    return logits, dms.cache_stats(cache)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", default="artifacts/smollm2_135m_dms_cr8")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--texts", type=int, default=2)
    p.add_argument("--calib", type=int, default=8, help="calibration sequences (train split, 512 tokens)")
    p.add_argument("--out", default="benchmarks/results/fp8/fp8_table.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    base, tok = dms.load_model(args.model)
    original = copy.deepcopy(base)  # the uncompressed reference (heads with LoRA change the weights)
    dms.load_adapters(base, args.adapters)
    original = dms.apply_dms(original, dms.dms_config(base))
    calib_ids = build_token_sequences(
        tok, PYTHON_DOCS_GLOB, 512, "train", max_sequences=args.calib, cache_dir=DEFAULT_CACHE_DIR
    )
    calib = [calib_ids[i : i + 1] for i in range(calib_ids.shape[0])]
    log(f"calibrating FP8 KV quantizers on {len(calib)} x 512 training tokens ...")
    fp8 = dms.quantize_fp8(copy.deepcopy(base), calib, weights=False, kv_cache=True)
    fp8_original = dms.quantize_fp8(copy.deepcopy(original), calib, weights=False, kv_cache=True)
    methods = {
        "dense (fp32 cache)": (original, True),
        "FP8 KV only": (fp8_original, True),
        "DMS": (base, False),
        "DMS + FP8 KV": (fp8, False),
    }
    results = {"command": " ".join([sys.executable, *sys.argv]), "adapters": args.adapters, "rows": []}
    for ctx in args.contexts:
        texts = build_token_sequences(
            tok,
            PYTHON_DOCS_GLOB,
            ctx,
            "heldout",
            max_sequences=args.texts,
            cache_dir=DEFAULT_CACHE_DIR,
        )
        acc = {
            name: {"kl": 0.0, "kl_vs_dms": 0.0, "match": 0.0, "alloc": 0, "dense": 0, "cr": 0.0}
            for name in methods
        }
        for j in range(texts.shape[0]):
            ids = texts[j : j + 1]
            ref, _ = run_method(original, ids, True)
            dms_logits = None
            for name, (model, disabled) in methods.items():
                logits, st = run_method(model, ids, disabled)
                if name == "DMS":
                    dms_logits = logits
                a = acc[name]
                a["kl"] += float(kl_per_token(ref, logits).mean()) / texts.shape[0]
                a["match"] += top1_agreement(ref, logits) / texts.shape[0]
                a["alloc"] += st["kv_bytes_allocated"] // texts.shape[0]
                a["dense"] += st["kv_bytes_dense"] // texts.shape[0]
                a["cr"] += st["compression_ratio"] / texts.shape[0]
                if name == "DMS + FP8 KV":
                    a["kl_vs_dms"] += float(kl_per_token(dms_logits, logits).mean()) / texts.shape[0]
                log(
                    f"ctx {ctx} text {j} {name}: KL {float(kl_per_token(ref, logits).mean()):.4f} "
                    f"alloc {st['kv_bytes_allocated'] / 2**20:.1f} MiB"
                )
        for name, a in acc.items():
            dense_fp32 = a["dense"]  # kv_bytes_dense counts the model's compute dtype (fp32 here)
            results["rows"].append(
                {
                    "context": ctx,
                    "method": name,
                    "compression_ratio": a["cr"],
                    "kv_mib_allocated": a["alloc"] / 2**20,
                    "fewer_bytes_than_dense_bf16": dense_fp32 / 2 / a["alloc"],
                    "fewer_bytes_than_dense_fp32": dense_fp32 / a["alloc"],
                    "kl_vs_uncompressed": a["kl"],
                    "argmax_match": a["match"],
                    "kl_dms_fp8_minus_dms": (a["kl"] - acc["DMS"]["kl"]) if name == "DMS + FP8 KV" else None,
                    "kl_dms_fp8_vs_dms_logits": a["kl_vs_dms"] if name == "DMS + FP8 KV" else None,
                }
            )
    results["seconds"] = round(time.time() - t0, 1)
    lines = [
        "| context | method | achieved CR | KV MiB allocated | × fewer bytes than dense bf16 "
        "| × fewer than dense fp32 | KL vs uncompressed (nats/tok) | argmax match |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['context']} | {r['method']} | {r['compression_ratio']:.2f} | "
            f"{r['kv_mib_allocated']:.1f} | "
            f"{r['fewer_bytes_than_dense_bf16']:.1f} | {r['fewer_bytes_than_dense_fp32']:.1f} | "
            f"{r['kl_vs_uncompressed']:.4f} | {r['argmax_match']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    for r in results["rows"]:
        if r["method"] == "DMS + FP8 KV":
            print(
                f"ctx {r['context']}: KL(DMS+FP8) - KL(DMS) = {r['kl_dms_fp8_minus_dms']:+.4f} nats/token; "
                f"KL(DMS logits || DMS+FP8 logits) = {r['kl_dms_fp8_vs_dms_logits']:.4f}"
            )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"Command: `{results['command']}` ({results['seconds']} s)\n\n{table}\n")
    _plot(results, os.path.splitext(args.out)[0] + ".png")
    return results


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["rows"]:
        ax.scatter(r["kv_mib_allocated"], r["kl_vs_uncompressed"], label=f"{r['method']} @{r['context']}")
    ax.set(
        xscale="log",
        xlabel="KV MiB allocated (log)",
        ylabel="KL vs uncompressed (nats/token)",
        title="SmolLM2-135M: KV bytes vs fidelity",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
