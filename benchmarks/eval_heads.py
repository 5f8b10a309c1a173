"""Evaluate trained DMS heads on held-out real text of every source against the uncompressed model.

Fidelity (KL, token match, achieved CR) is measured per text source (each source's own held-out
files, never trained on); pass keys (>= 24 per length by default: 3 depths x 8 seeds) are hidden
in held-out ``--passkey-source`` text and carry Wilson 95% intervals. Prints markdown tables and
writes JSON + md + a PNG plot. Example:

    .venv/bin/python benchmarks/eval_heads.py --adapters artifacts/smollm2_135m_dms_cr8 \
        --contexts 2048 --out benchmarks/results/heads/heads_cr8.json
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
from modelopt_dms.corpus import DEFAULT_CACHE_DIR, build_token_sequences, split_token_stream
from modelopt_dms.evaluation import fidelity_on_text, passkey_accuracy, passkey_samples
from modelopt_dms.export.adapters import check_adapters
from modelopt_dms.export.hf_checkpoint import load_exported
from modelopt_dms.text_sources import SOURCES, source_files


def log(msg: str) -> None:
    print(msg, flush=True)


def _heldout_windows(tok, sources: list[str], contexts: list[int], texts: int) -> dict:
    """``{source: {context: (n, context) ids}}`` of held-out windows; sources without one are left out."""
    out: dict = {}
    for src in sources:
        for c in contexts:
            try:
                rows = build_token_sequences(
                    tok, src, c, "heldout", max_sequences=texts, cache_dir=DEFAULT_CACHE_DIR
                )
            except (FileNotFoundError, ValueError) as err:
                log(f"[skip] {src} @ {c}: {err}")
                continue
            out.setdefault(src, {})[c] = rows
    return out


def _training_tokens(path: str) -> int | None:
    """Tokens the heads were trained on, recorded now (an artifact folder may later hold other heads):
    from ``selection.json`` (``modelopt-dms select``) or ``summary.json`` next to them."""
    for name in ("selection.json", "summary.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                tokens = json.load(fh).get("tokens")
            if tokens:
                return int(tokens)
    return None


def main(argv: list[str] | None = None) -> dict:
    installed = [name for name in SOURCES if source_files(name)]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", action="append", default=[], help="adapters dir(s); repeat to compare")
    p.add_argument(
        "--exported",
        action="append",
        default=[],
        help="HF export dir(s) of DMS models (e.g. all weights trained), compared with the original --model",
    )
    p.add_argument("--sources", nargs="+", default=installed, help="text sources for fidelity")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048])
    p.add_argument("--texts", type=int, default=2, help="held-out text windows per (source, context)")
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--passkey-source", default="python-docs", help="held-out filler text for pass keys")
    p.add_argument(
        "--passkey-contexts",
        type=int,
        nargs="*",
        default=[1024, 2048, 4096],
        help="pass-key lengths (the flag alone: fidelity only, no pass keys)",
    )
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-seeds", type=int, default=8, help="pass keys per (length, depth)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/heads/heads_eval.json")
    args = p.parse_args(argv)
    if not args.adapters and not args.exported:
        p.error("name the heads to evaluate: --adapters DIR and/or --exported DIR")
    torch.set_num_threads(args.threads)
    t_start = time.time()
    base, tok = dms.load_model(args.model)
    results = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "heldout": "each source's held-out files (5% of its distinct files, seed 0), never trained on",
        "methods": {},
    }
    held = _heldout_windows(tok, args.sources, args.contexts, args.texts)
    stream = split_token_stream(tok, args.passkey_source, "heldout", cache_dir=DEFAULT_CACHE_DIR)
    samples = passkey_samples(tok, stream, args.passkey_contexts, args.passkey_depths, args.passkey_seeds)

    heads = [("adapters", a) for a in args.adapters] + [("exported", e) for e in args.exported]
    for i, (kind, path) in enumerate(heads):
        model, reference = _heads_model(base, kind, path)
        window = dms.dms_config(model).window_size
        name = os.path.basename(os.path.normpath(path))
        entry = {
            kind: path,
            "window_size": window,
            "training_tokens": _training_tokens(path),
            "fidelity": {},
            "passkey": {},
        }
        for src, by_ctx in held.items():
            for c, windows in by_ctx.items():
                rows = []
                for j in range(windows.shape[0]):
                    r = fidelity_on_text(
                        model, windows[j : j + 1], window, args.generate, reference=reference
                    )
                    rows.append(r.to_dict())
                    log(
                        f"[{name}] {src} ctx {c} text {j}: CR {r.compression_ratio:.2f} "
                        f"KL {r.kl_per_token:.4f} match {r.token_match:.3f}"
                    )
                avg = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
                entry["fidelity"].setdefault(src, {})[c] = {**avg, "n": len(rows)}
        for c in args.passkey_contexts:
            subset = [s for s in samples if s.context_tokens == c]
            dms_res = passkey_accuracy(model, tok, subset)
            if i == 0:
                uncompressed = model if reference is None else reference
                with dms.eviction_disabled(uncompressed):
                    base_res = passkey_accuracy(uncompressed, tok, subset)
                results.setdefault("passkey_uncompressed", {})[c] = {
                    k: v for k, v in base_res.items() if k != "answers"
                }
                log(f"[uncompressed] passkey ctx {c}: {base_res['correct']}/{base_res['n']}")
            entry["passkey"][c] = {k: v for k, v in dms_res.items() if k != "answers"}
            log(
                f"[{name}] passkey ctx {c}: {dms_res['correct']}/{dms_res['n']} "
                f"(CR {dms_res['compression_ratio']:.2f})"
            )
        results["methods"][name] = entry
    results["seconds"] = round(time.time() - t_start, 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    table = render(results)
    print(table)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"Command: `{results['command']}` ({results['seconds'] / 60:.0f} min)\n\n{table}\n")
    _plot(results, os.path.splitext(args.out)[0] + ".png")
    return results


def _heads_model(base, kind: str, path: str):
    """``(DMS model, reference)``: the heads to evaluate and the uncompressed model to compare with.

    ``reference`` None: the heads' own model without eviction (adapters only: the base weights are
    the original ones). Heads that change the base weights (LoRA deltas, merged on load; an export
    with all weights trained) are compared with the original: the base with the same DMS config and
    no adapters, run without eviction.
    """
    if kind == "exported":
        model, _ = load_exported(path)
        weights_changed = True
    else:
        weights_changed = "lora" in check_adapters(path)
        model = dms.load_adapters(copy.deepcopy(base), path)
    if not weights_changed:
        return model, None
    return model, dms.apply_dms(copy.deepcopy(base), dms.dms_config(model))


def _pk(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['correct']}/{r['n']} = {100 * r['accuracy']:.0f}% ({100 * lo:.0f}\u2013{100 * hi:.0f})"


def render(results: dict) -> str:
    """Markdown: fidelity per (heads, source, context), then pass keys (if any) with Wilson 95% intervals."""
    lines = [
        "| heads | source | context | texts | achieved CR | KL (nats/tok) | KL after window | token match |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        for src, by_ctx in e["fidelity"].items():
            for c, r in by_ctx.items():
                cells = [name, src, c, r["n"], f"{r['compression_ratio']:.2f}", f"{r['kl_per_token']:.4f}"]
                cells += [f"{r['kl_per_token_after_window']:.4f}", f"{r['token_match']:.3f}"]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
    if not any(e["passkey"] for e in results["methods"].values()):
        return "\n".join(lines)
    lines += [
        "",
        "| heads | pass-key context | DMS (95% CI) | uncompressed (95% CI) | achieved CR |",
        "|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        for c, r in e["passkey"].items():
            u = results["passkey_uncompressed"][c]
            lines.append(f"| {name} | {c} | {_pk(r)} | {_pk(u)} | {r['compression_ratio']:.2f} |")
    return "\n".join(lines)


def statistics_mean(by_ctx: dict) -> float:
    """Mean KL over a source's contexts (nan when the source had no held-out window)."""
    vals = [r["kl_per_token"] for r in by_ctx.values()]
    return sum(vals) / len(vals) if vals else float("nan")


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["methods"])
    sources = sorted({src for e in results["methods"].values() for src in e["fidelity"]})
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        fid = results["methods"][name]["fidelity"]
        kl = [statistics_mean(fid.get(src, {})) for src in sources]
        axes[0].bar([x + k * width for x in range(len(sources))], kl, width, label=name)
        pk = results["methods"][name]["passkey"]
        ctx = sorted(pk, key=int)
        acc = [100 * pk[c]["accuracy"] for c in ctx]
        err = [
            [a - 100 * pk[c]["ci95"][0] for a, c in zip(acc, ctx, strict=True)],
            [100 * pk[c]["ci95"][1] - a for a, c in zip(acc, ctx, strict=True)],
        ]
        axes[1].errorbar([int(c) for c in ctx], acc, yerr=err, fmt="o-", capsize=3, label=name)
    unc = results.get("passkey_uncompressed", {})
    if unc:
        ctx = sorted(unc, key=int)
        axes[1].plot(
            [int(c) for c in ctx], [100 * unc[c]["accuracy"] for c in ctx], "k*--", label="uncompressed"
        )
    axes[0].set_xticks([x + 0.4 - width / 2 for x in range(len(sources))], sources, rotation=20, fontsize=8)
    axes[0].set(ylabel="KL(teacher||student) nats/token", title="fidelity per held-out source")
    axes[1].set(xlabel="context tokens", ylabel="pass keys found (%), 95% CI", title="pass-key retrieval")
    axes[1].set_xscale("log", base=2)
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot -> {path}")


if __name__ == "__main__":
    main()
