"""Evaluate trained DMS heads on held-out real text against the uncompressed model.

Prints a markdown table and writes JSON + a PNG plot. Example:

    .venv/bin/python benchmarks/eval_heads.py --adapters artifacts/smollm2_135m_dms_cr8 \
        --contexts 1024 2048 4096 --out benchmarks/results/heads/heads_cr8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

import modelopt_dms as dms
from modelopt_dms.corpus import DEFAULT_CACHE_DIR, PYTHON_DOCS_GLOB, build_token_sequences, split_token_stream
from modelopt_dms.evaluation import fidelity_on_text, passkey_accuracy, passkey_samples


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", action="append", required=True, help="adapters dir(s); repeat to compare")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--texts", type=int, default=2, help="held-out text windows per context")
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--passkey-contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/heads/heads_eval.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    base, tok = dms.load_model(args.model)
    results = {
        "command": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "heldout": "python3-doc .rst.txt files in the held-out split (5% of files, seed 0), never trained on",
        "methods": {},
    }
    held = {
        c: build_token_sequences(
            tok,
            PYTHON_DOCS_GLOB,
            c,
            "heldout",
            max_sequences=args.texts,
            cache_dir=DEFAULT_CACHE_DIR,
        )
        for c in args.contexts
    }
    stream = split_token_stream(tok, PYTHON_DOCS_GLOB, "heldout")
    samples = passkey_samples(tok, stream, args.passkey_contexts, args.passkey_depths, args.passkey_seeds)

    for i, adapters in enumerate(args.adapters):
        model = copy.deepcopy(base)
        dms.load_adapters(model, adapters)
        window = dms.dms_config(model).window_size
        name = os.path.basename(os.path.normpath(adapters))
        entry = {"adapters": adapters, "window_size": window, "fidelity": {}, "passkey": {}}
        for c in args.contexts:
            rows = []
            for j in range(held[c].shape[0]):
                r = fidelity_on_text(model, held[c][j : j + 1], window, args.generate)
                rows.append(r.to_dict())
                log(
                    f"[{name}] ctx {c} text {j}: CR {r.compression_ratio:.2f} KL {r.kl_per_token:.4f} "
                    f"match {r.token_match:.3f} ppl {r.ppl_teacher:.2f}->{r.ppl_student:.2f}"
                )
            entry["fidelity"][c] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        for c in args.passkey_contexts:
            subset = [s for s in samples if s.context_tokens == c]
            dms_res = passkey_accuracy(model, tok, subset)
            if i == 0:
                with dms.eviction_disabled(model):
                    base_res = passkey_accuracy(model, tok, subset)
                results.setdefault("passkey_uncompressed", {})[c] = {
                    k: v for k, v in base_res.items() if k != "answers"
                }
                log(f"[uncompressed] passkey ctx {c}: {base_res['accuracy']:.2f}")
            entry["passkey"][c] = {k: v for k, v in dms_res.items() if k != "answers"}
            log(
                f"[{name}] passkey ctx {c}: {dms_res['accuracy']:.2f} (CR {dms_res['compression_ratio']:.2f})"
            )
        results["methods"][name] = entry
    results["seconds"] = round(time.time() - t_start, 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "| heads | context | achieved CR | KL (nats/tok) | KL after window | token match | ppl dense->DMS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        for c, r in e["fidelity"].items():
            lines.append(
                f"| {name} | {c} | {r['compression_ratio']:.2f} | {r['kl_per_token']:.4f} | "
                f"{r['kl_per_token_after_window']:.4f} | {r['token_match']:.3f} | "
                f"{r['ppl_teacher']:.2f} -> {r['ppl_student']:.2f} |"
            )
    lines += [
        "",
        "| heads | passkey context | accuracy | uncompressed | achieved CR |",
        "|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        for c, r in e["passkey"].items():
            u = results["passkey_uncompressed"][c]["accuracy"]
            lines.append(f"| {name} | {c} | {r['accuracy']:.2f} | {u:.2f} | {r['compression_ratio']:.2f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"Command: `{results['command']}`\n\n{table}\n")
    _plot(results, os.path.splitext(args.out)[0] + ".png")
    return results


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, e in results["methods"].items():
        ctx = sorted(e["fidelity"], key=int)
        axes[0].plot(
            [int(c) for c in ctx], [e["fidelity"][c]["compression_ratio"] for c in ctx], "o-", label=name
        )
        axes[1].plot([int(c) for c in ctx], [e["fidelity"][c]["kl_per_token"] for c in ctx], "o-", label=name)
    axes[0].set(xlabel="context tokens", ylabel="achieved compression ratio", title="KV compression")
    axes[1].set(xlabel="context tokens", ylabel="KL(teacher||student) nats/token", title="fidelity")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot -> {path}")


if __name__ == "__main__":
    main()
