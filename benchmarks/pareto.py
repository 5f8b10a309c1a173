#!/usr/bin/env python
"""Where the trained heads stand against the quality targets: accuracy vs achieved CR and tokens.

Reads committed results only (no model runs): heads evaluations (``eval_heads.py`` JSON, every
method in them) and ablation tables (``ablate.py`` JSON, every variant). One point per set of
heads: the achieved compression ratio at the evaluation context (mean over sources, window
included) against KL per token (mean over sources), greedy token match (the top-1 agreement of
the fidelity run) and pass-key accuracy minus the uncompressed model's; the issue's CR-4 and CR-8
targets are drawn as boxes. A second row plots the same metrics against training tokens.

    .venv/bin/python benchmarks/pareto.py \\
        --heads benchmarks/results/heads/heads_clean_split.json \\
        --ablation benchmarks/results/ablation/ablation_cr4_cpu.json \\
        --tokens "smollm2_135m_dms_cr4 [heads_clean_split]=307200"

Writes ``benchmarks/results/pareto/pareto.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from common import RESULTS, command_line, write_outputs

# the targets: (CR at least, KL at most, token match at least, pass-key gap at most there)
TARGETS = {
    "CR 4": (4.0, 0.04, 0.95, 0.05, ("1024", "2048", "4096")),
    "CR 8": (8.0, 0.10, 0.90, 0.10, ("1024", "2048")),
}


def _point(label: str, fidelity: dict, passkey: dict, unc: dict, tokens: int | None) -> dict:
    per_src = [next(iter(by_ctx.values())) for by_ctx in fidelity.values() if by_ctx]
    gaps = {
        c: passkey[c]["accuracy"] - unc[c]["accuracy"] for c in passkey if c in unc and "accuracy" in unc[c]
    }
    return {
        "label": label,
        "tokens": tokens,
        "compression_ratio": mean(x["compression_ratio"] for x in per_src),
        "kl": mean(x["kl_per_token"] for x in per_src),
        "token_match": mean(x["token_match"] for x in per_src),
        "passkey_gap": gaps,
        "sources": sorted(fidelity),
    }


def points_from_heads(path: Path, tokens: dict[str, int] | None = None) -> list[dict]:
    """One point per method of an ``eval_heads.py`` result, labelled ``name [file stem]`` (one
    folder may hold different heads at two evaluations). Training tokens: ``tokens[label]`` (``--tokens``,
    e.g. to add the tokens of the heads a warm-started run began from: a run records only its own),
    else those the result recorded (``training_tokens``), else unknown."""
    d = json.loads(path.read_text())
    unc = d.get("passkey_uncompressed", {})
    points = []
    for name, m in d["methods"].items():
        label = f"{name} [{path.stem}]"
        known = (tokens or {}).get(label) or m.get("training_tokens")
        points.append(_point(label, m["fidelity"], m["passkey"], unc, known))
    return points


def points_from_ablation(path: Path) -> list[dict]:
    """One point per variant of an ``ablate.py`` result."""
    d = json.loads(path.read_text())
    return [
        _point(
            f"ablation:{r['variant']}", r["fidelity"], r["passkey"], r["passkey_uncompressed"], r["tokens"]
        )
        for r in d["rows"]
    ]


def _target_reached(p: dict) -> str | None:
    """The highest target whose CR the point reaches (None below every target's CR)."""
    reached = [name for name, t in TARGETS.items() if p["compression_ratio"] >= t[0]]
    return reached[-1] if reached else None


def _y(p: dict, ykey: str) -> float:
    """A point's value on a plot's y axis: a metric, or ``gap`` = its worst pass-key gap."""
    return min(p["passkey_gap"].values(), default=float("nan")) if ykey == "gap" else p[ykey]


def verdict(p: dict) -> str:
    """Which target the point meets, or what it misses against the nearest one below its CR."""
    name = _target_reached(p)
    if name is None:
        return f"below CR 4 ({p['compression_ratio']:.2f})"
    _, kl, match, gap, contexts = TARGETS[name]
    misses = []
    if p["kl"] > kl:
        misses.append(f"KL {p['kl']:.3f} > {kl}")
    if p["token_match"] < match:
        misses.append(f"match {p['token_match']:.2f} < {match}")
    worst = min((g for c, g in p["passkey_gap"].items() if str(c) in contexts), default=0.0)
    if worst < -gap:
        misses.append(f"pass key {100 * worst:+.0f} pts")
    unmeasured = [c for c in contexts if c not in {str(k) for k in p["passkey_gap"]}]
    said = f"{name}: " + ("meets" if not misses else "misses " + ", ".join(misses))
    if unmeasured:  # a target checked only in part is not met
        said += ("" if misses else " where measured") + f"; no pass keys at {', '.join(unmeasured)}"
    return said


def render(points: list[dict]) -> str:
    contexts = sorted({c for p in points for c in p["passkey_gap"]}, key=int)
    head = ["heads", "training tokens", "CR (mean over sources)", "KL", "token match"]
    head += [f"pass key gap @{c}" for c in contexts] + ["against the targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda p: p["compression_ratio"]):
        cells = [p["label"], f"{p['tokens']:,}" if p["tokens"] else "-", f"{p['compression_ratio']:.2f}"]
        cells += [f"{p['kl']:.4f}", f"{p['token_match']:.3f}"]
        cells += [f"{100 * p['passkey_gap'][c]:+.0f}" if c in p["passkey_gap"] else "-" for c in contexts]
        cells.append(verdict(p))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict], png: Path) -> None:
    """Two rows of three panels (KL, token match, pass-key gap against CR and training tokens). Heads are
    numbered in order of training tokens (the legend names them) and coloured by the target their CR
    reaches; the equal-budget ablations are small grey dots, unlabelled (their table has the names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablations = [p for p in points if p["label"].startswith("ablation:")]
    heads = sorted(
        (p for p in points if not p["label"].startswith("ablation:")), key=lambda p: p["tokens"] or 0
    )
    colour = {"CR 8": "tab:orange", "CR 4": "tab:blue", None: "tab:blue"}  # judged against CR 4 below it

    metrics = [("kl", "KL per token (nats)"), ("token_match", "token match (top-1)"), ("gap", "pass-key gap")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5))
    for row, xkey in enumerate(("compression_ratio", "tokens")):
        for col, (ykey, ylabel) in enumerate(metrics):
            ax = axes[row, col]
            for p in ablations:
                if p[xkey] is not None:
                    ax.scatter(p[xkey], _y(p, ykey), s=14, color="grey", alpha=0.6)
            for i, p in enumerate(heads, 1):
                if p[xkey] is None:
                    continue
                x, y = p[xkey], _y(p, ykey)
                ax.scatter(x, y, s=40, color=colour[_target_reached(p)])
                ax.annotate(str(i), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if xkey == "compression_ratio":
                for name, (cr, kl, match, gap, _) in TARGETS.items():
                    bound = {"kl": kl, "token_match": match, "gap": -gap}[ykey]
                    ax.axvline(cr, color="grey", ls=":", lw=0.8)
                    ax.plot([cr, cr + 1.5], [bound, bound], color="green", lw=2)
                    ax.annotate(f"{name} target", (cr, bound), fontsize=6, color="green")
            ax.set(xlabel="achieved CR (2K context)" if row == 0 else "training tokens", ylabel=ylabel)
            if xkey == "tokens":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
    axes[0, 2].set_title("worst pass-key accuracy minus uncompressed", fontsize=8)
    names = [f"{i}: {p['label']} (CR {p['compression_ratio']:.2f})" for i, p in enumerate(heads, 1)]
    if ablations:
        names.append(f"grey: {len(ablations)} equal-budget ablations")
    fig.text(0.01, 0.01, "\n".join(names), fontsize=6.5, va="bottom", family="monospace")
    title = "trained DMS heads against the quality targets (SmolLM2-135M, clean held-out text)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03 + 0.0125 * len(names), 1, 1))
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=Path, nargs="*", default=[])
    p.add_argument("--ablation", type=Path, nargs="*", default=[])
    p.add_argument(
        "--tokens",
        nargs="*",
        default=[],
        help="training tokens of heads, 'NAME [FILE_STEM]=N': for results that did not record them, or to "
        "replace what they recorded (a warm-started run records only its own tokens)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "pareto" / "pareto.json")
    args = p.parse_args(argv)
    tokens = {}
    for item in args.tokens:
        label, _, n = item.rpartition("=")
        if not label or not n.isdigit():
            p.error(f"--tokens takes 'NAME [FILE_STEM]=N', got {item!r}")
        tokens[label] = int(n)
    points = [pt for f in args.heads for pt in points_from_heads(f, tokens)]
    points += [pt for f in args.ablation for pt in points_from_ablation(f)]
    if not points:
        raise SystemExit("nothing to plot: give --heads and/or --ablation result files")
    table = render(points)
    print(table)
    sources = [str(f) for f in [*args.heads, *args.ablation]]
    payload = {"command": command_line(), "inputs": sources, "targets": TARGETS, "points": points}
    md = f"# Heads against the quality targets\n\nCommand: `{payload['command']}`\n\n{table}\n"
    write_outputs(args.out.parent, args.out.stem, payload, md, lambda png: plot(points, png))
    return payload


if __name__ == "__main__":
    main()
