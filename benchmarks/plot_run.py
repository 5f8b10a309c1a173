#!/usr/bin/env python
"""The curve of one training run: KL and eviction per step, and the scored snapshots.

Reads a run folder only (no model runs): ``train_log.jsonl`` (one record per step, written by the
trainer) and, when ``modelopt-dms select`` has run, its ``selection_cr<target>.json`` (every
snapshot's achieved CR and KL on training-split text at the selection context). Prints a table of
the log in windows of ``--every`` steps and the snapshot scores, and writes JSON + md + PNG.

    .venv/bin/python benchmarks/plot_run.py training_runs/smollm2_135m_dms_cr4

Writes ``benchmarks/results/training_curves/<run name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from common import RESULTS, command_line, write_outputs


def read_log(run_dir: Path) -> list[dict]:
    """The step records of ``run_dir/train_log.jsonl``, in step order (the last record per step)."""
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give a training run folder (its output.dir)")
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
    if not by_step:
        raise SystemExit(f"{path} holds no step records yet")
    return [by_step[s] for s in sorted(by_step)]


def read_selections(run_dir: Path) -> list[dict]:
    """Every ``selection_cr*.json`` record of the run, by target."""
    records = [
        {**json.loads(p.read_text()), "file": p.name} for p in sorted(run_dir.glob("selection_cr*.json"))
    ]
    return sorted(records, key=lambda r: (r["target_compression_ratio"], r.get("from_step") or 0, r["file"]))


def windows(log: list[dict], every: int) -> list[dict]:
    """Means of KL, eviction rate, target eviction rate and tokens/s over steps ``(k*every, (k+1)*every]``."""
    groups: dict[int, list[dict]] = {}
    for rec in log:
        groups.setdefault((rec["step"] - 1) // every, []).append(rec)
    rows = []
    for k in sorted(groups):
        recs = groups[k]
        rows.append(
            {
                "first_step": recs[0]["step"],
                "last_step": recs[-1]["step"],
                "kl": mean(r["kl"] for r in recs),
                "eviction_rate": mean(r["eviction_rate"] for r in recs),
                "target_eviction_rate": mean(r["target_eviction_rate"] for r in recs),
                "target_cr": recs[-1]["target_cr"],
                "tokens_per_s": mean(r["tokens_per_s"] for r in recs),
            }
        )
    return rows


def render(name: str, rows: list[dict], selections: list[dict]) -> str:
    lines = [
        f"## {name}: the training log in windows",
        "",
        "| steps | mean KL (train rows) | eviction rate | target eviction rate | target CR (last) "
        "| tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['first_step']}–{r['last_step']} | {r['kl']:.4f} | {r['eviction_rate']:.3f} | "
            f"{r['target_eviction_rate']:.3f} | {r['target_cr']:.2f} | {r['tokens_per_s']:.0f} |"
        )
    for sel in selections:
        chosen = sel["chosen"]["step"]
        lines += [
            "",
            f"## Snapshots scored for CR {sel['target_compression_ratio']:g} "
            f"({sel['rows']} x {sel['context']} training-split tokens; {sel['rule']}; "
            f"record `{sel['file']}`)",
            "",
            "| step | achieved CR | KL past the window | calibrated: offset, CR, KL | |",
            "|---|---|---|---|---|",
        ]
        calibrated = {c["step"]: c for c in sel.get("calibrated_candidates", [])}
        for s in sel["snapshots"]:
            mark = "chosen" if s["step"] == chosen else ""
            c = calibrated.get(s["step"])
            cal = f"{c['logit_offset']:+.3f}, {c['compression_ratio']:.2f}, {c['kl']:.4f}" if c else ""
            lines.append(f"| {s['step']} | {s['compression_ratio']:.2f} | {s['kl']:.4f} | {cal} | {mark} |")
    return "\n".join(lines)


def plot(name: str, log: list[dict], rows: list[dict], selections: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    mids = [(r["first_step"] + r["last_step"]) / 2 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(steps, [r["kl"] for r in log], lw=0.5, alpha=0.4, label="per step")
    ax.plot(mids, [r["kl"] for r in rows], marker="o", label="window mean")
    ax.set(xlabel="step", ylabel="KL per token (train rows, nats)", title="distillation KL")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(steps, [r["eviction_rate"] for r in log], lw=0.5, alpha=0.5, label="eviction rate")
    ax.plot(steps, [r["target_eviction_rate"] for r in log], color="black", ls="--", label="target")
    ax.set(xlabel="step", ylabel="fraction of decisions = evict", title="eviction vs the schedule")
    ax.legend(fontsize=7)
    ax = axes[2]
    for sel in selections:
        snaps = sel["snapshots"]
        target = sel["target_compression_ratio"]
        crs, kls = [s["compression_ratio"] for s in snaps], [s["kl"] for s in snaps]
        ax.plot(crs, kls, marker="o", label=f"CR {target:g}")
        for s in snaps:
            ax.annotate(
                str(s["step"]),
                (s["compression_ratio"], s["kl"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        c = sel["chosen"]
        ax.scatter([c["compression_ratio"]], [c["kl"]], s=120, facecolors="none", edgecolors="red")
        ax.axvline(target, color="grey", ls=":")
    ax.set(xlabel="achieved CR (selection context)", ylabel="KL past the window")
    ax.set_title("snapshots (red: chosen)")
    if not selections:
        ax.text(0.5, 0.5, "no selection yet", ha="center", transform=ax.transAxes)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"training run {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training run folder (the recipe's output.dir)")
    p.add_argument("--every", type=int, default=50, help="steps per table row")
    p.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/training_curves/<run name>.json"
    )
    args = p.parse_args(argv)
    if args.every < 1:
        raise SystemExit(f"--every must be >= 1, got {args.every}")
    name = args.run_dir.resolve().name
    log = read_log(args.run_dir)
    rows = windows(log, args.every)
    selections = read_selections(args.run_dir)
    table = render(name, rows, selections)
    print(table)
    out = args.out or RESULTS / "training_curves" / f"{name}.json"
    payload = {
        "command": command_line(),
        "run": name,
        "steps": log[-1]["step"],
        "windows": rows,
        "selections": selections,
    }
    md = f"# Training run {name}\n\nCommand: `{payload['command']}`\n\n{table}\n"
    write_outputs(out.parent, out.stem, payload, md, lambda png: plot(name, log, rows, selections, png))
    return payload


if __name__ == "__main__":
    main()
