"""Would a longer delayed-eviction window buy fidelity at the same compression? A training-free probe.

DMS keeps the ``w + 1`` newest tokens and, further back, only tokens whose decision was "keep"; a
decision is final, so trained heads cannot keep "the last few hundred tokens" the way StreamingLLM
does. At CR 8 after 2K tokens the window (65 tokens) is a quarter of the cache. This probe runs
trained heads with other *inference* windows, recalibrates the decision threshold (``logit_offset``)
so that each reaches the same achieved CR on training-split rows, and measures KL and top-1
agreement on held-out rows over the same positions. The heads were trained for their own window:
heads trained for another one would choose differently, so this does not bound what such training gives.

    .venv/bin/python benchmarks/probe_window.py --adapters artifacts/smollm2_135m_dms_cr8 \
        --target 8 --windows 64 128 192 --out benchmarks/results/window/probe_window_cr8.json

Writes ``<out>.json`` and ``<out>.md`` (table and command).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import environment, log, write_outputs  # noqa: E402

import modelopt_dms as dms  # noqa: E402
from modelopt_dms.corpus import DEFAULT_CACHE_DIR, build_token_sequences  # noqa: E402
from modelopt_dms.evaluation import fidelity_on_text  # noqa: E402
from modelopt_dms.export.adapters import check_adapters  # noqa: E402
from modelopt_dms.training.calibration import calibrate_decision_offset  # noqa: E402
from modelopt_dms.training.selection import uncompressed_logits  # noqa: E402


def set_window(model: torch.nn.Module, window: int) -> None:
    """Run ``model``'s DMS layers with another delayed-eviction window (inference only; not saved)."""
    mods = dms.dms_modules(model)
    config = mods[0].dms_config.model_copy(update={"window_size": int(window)})
    for m in mods:
        m.dms_config = config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", required=True)
    p.add_argument("--target", type=float, default=8.0, help="achieved CR every window is calibrated to")
    p.add_argument("--windows", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--sources", nargs="+", default=["python-docs", "manpages"])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--calib-rows", type=int, default=2, help="training-split rows per source to calibrate on")
    p.add_argument("--texts", type=int, default=3, help="held-out rows per source to measure on")
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/window/probe_window.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    base, tok = dms.load_model(args.model)
    base.eval()

    def rows(split: str, n: int) -> list[torch.Tensor]:
        return [
            build_token_sequences(tok, s, args.context, split, max_sequences=n, cache_dir=DEFAULT_CACHE_DIR)
            for s in args.sources
        ]

    calib = torch.cat(rows("train", args.calib_rows))
    held = dict(zip(args.sources, rows("heldout", args.texts), strict=True))
    lora = "lora" in check_adapters(args.adapters)
    skip = max(args.windows)  # KL over the same positions for every window
    results: dict = {
        "environment": environment(),
        "adapters": args.adapters,
        "target": args.target,
        "rows": [],
    }
    # LoRA heads change the model's logits, so the uncompressed reference is the base model with
    # DMS applied and no adapters; its window does not matter (nothing is evicted), so build it once.
    ref_model = None
    reference = None
    for w in args.windows:
        model = dms.load_adapters(copy.deepcopy(base), args.adapters)
        trained_window = dms.dms_config(model).window_size
        if lora and ref_model is None:
            ref_model = dms.apply_dms(copy.deepcopy(base), dms.dms_config(model))
        set_window(model, w)
        if reference is None:
            reference = uncompressed_logits(ref_model if lora else model, calib)
        cal = calibrate_decision_offset(model, calib, args.target, skip, reference, margin=0.0, log=log)
        row = {
            "window": w,
            "trained_window": trained_window,
            "logit_offset": cal.offset,
            "calib_cr": round(cal.compression_ratio, 4),
            "calib_kl": round(cal.kl, 6),
            "sources": {},
        }
        for src, windows in held.items():
            res = [
                fidelity_on_text(model, windows[j : j + 1], skip, args.generate, reference=ref_model)
                for j in range(windows.shape[0])
            ]
            row["sources"][src] = {
                "n": len(res),
                "compression_ratio": sum(r.compression_ratio for r in res) / len(res),
                "kl_after": sum(r.kl_per_token_after_window for r in res) / len(res),
                "top1": sum(r.token_match for r in res) / len(res),
            }
            s = row["sources"][src]
            log(
                f"[w={w}] {src}: CR {s['compression_ratio']:.2f} KL {s['kl_after']:.4f} top-1 {s['top1']:.3f}"
            )
        results["rows"].append(row)
    results["seconds"] = round(time.time() - t0, 1)
    table = render(results)
    print(table)
    out = Path(args.out)
    command = results["environment"]["command"]
    write_outputs(
        out.parent,
        out.stem,
        results,
        f"Command: `{command}` ({results['seconds'] / 60:.0f} min)\n\n{table}\n",
    )
    return results


def render(results: dict) -> str:
    """One row per (window, source): the calibration and the held-out metrics."""
    lines = [
        f"Heads `{results['adapters']}` calibrated to CR {results['target']} for each inference window "
        "(KL and top-1 over the same positions for every window).",
        "",
        "| window | logit offset | calib CR | calib KL | source | CR | KL | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        for src, s in r["sources"].items():
            lines.append(
                f"| {r['window']} | {r['logit_offset']:.3f} | {r['calib_cr']:.2f} | {r['calib_kl']:.4f} "
                f"| {src} "
                f"| {s['compression_ratio']:.2f} | {s['kl_after']:.4f} | {100 * s['top1']:.1f}% |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
