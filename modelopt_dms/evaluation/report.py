"""Tables, goal checks and Pareto plots from the comparison harness's records."""

from __future__ import annotations

import os
from collections import defaultdict
from statistics import mean

from ..fileio import atomic_write_json, atomic_write_text
from .metrics import wilson_interval

__all__ = ["goal_checks", "render_markdown", "summarize", "update_readme", "write_report"]

TASK_TITLES = {
    "fidelity": "Fidelity on held-out text (scored continuation after the context)",
    "needle": "Single-needle retrieval (pass key)",
    "multi_needle": "Multi-needle retrieval (door codes, fraction recalled)",
    "multi_turn": "Multi-turn recall (fact in turn 1, asked in turn 3)",
}


def summarize(records: list[dict]) -> dict[str, list[dict]]:
    """Per task, one row per method: means of the score and of the memory columns."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    order: list[str] = []
    for r in records:
        groups[(r["task"], r["method"])].append(r)
        if r["method"] not in order:
            order.append(r["method"])
    out: dict[str, list[dict]] = {}
    for (task, method), rs in groups.items():
        row = {
            "method": method,
            "family": rs[0]["family"],
            "budget": rs[0]["budget"],
            "n": len(rs),
            "score": mean(r["score"] for r in rs),
            "compression_ratio": mean(r["compression_ratio"] for r in rs),
            "kept_tokens": mean(r["kept_tokens"] for r in rs),
            "input_tokens": mean(r["input_tokens"] for r in rs),
            "kv_mib": mean(r["kv_bytes"] for r in rs) / 2**20,
            "infeasible": sum(not r["budget_feasible"] for r in rs),
            "by_context": {
                c: mean(r["score"] for r in rs if r["context_tokens"] == c)
                for c in sorted({r["context_tokens"] for r in rs})
            },
        }
        if task == "fidelity":
            row["kl"] = mean(r["kl"] for r in rs)
            row["ppl"] = mean(r["ppl"] for r in rs)
        else:  # one answer per sample: a success rate, with its Wilson 95% interval
            row["ci95"] = list(wilson_interval(sum(r["score"] for r in rs), len(rs)))
            row["n_by_context"] = {c: sum(r["context_tokens"] == c for r in rs) for c in row["by_context"]}
        out.setdefault(task, []).append(row)
    for rows in out.values():
        rows.sort(key=lambda x: order.index(x["method"]))
    return out


# The retrofit targets per budget label (the quality issue's "must show"): achieved CR at the
# fidelity context, a top-1 floor and a KL ceiling there, the pass-key gap to the uncompressed
# model allowed at each listed length, multi-turn recall at least the uncompressed model's (CR 4),
# and DMS ahead of every press of its budget on every task (CR 8; shown for every budget).
TARGETS: dict[str, dict] = {
    "cr4": {
        "cr": 4.0,
        "top1": 0.95,
        "kl": 0.04,
        "gap": 0.05,
        "needle_contexts": (1024, 2048, 4096),
        "turns": True,
    },
    "cr8": {
        "cr": 8.0,
        "top1": 0.90,
        "kl": 0.10,
        "gap": 0.10,
        "needle_contexts": (1024, 2048),
        "turns": False,
    },
}


def _check(task: str, check: str, dms: float, other: float, other_method: str, ok, unit: str = "%") -> dict:
    return {
        "task": task,
        "check": check,
        "dms": dms,
        "other": other,
        "other_method": other_method,
        "pass": ok,
        "unit": unit,
    }


def _target_checks(task: str, d: dict, dense: dict | None, target: dict) -> list[dict]:
    """The issue's targets for one DMS row (``d``) of ``task``."""
    name, out = d["method"], []
    if task == "fidelity":
        cr, top1, kl = target["cr"], target["top1"], target["kl"]
        achieved = d["compression_ratio"]
        out.append(_check(task, f"{name} achieved CR >= {cr:g}", achieved, cr, "target", achieved >= cr, "x"))
        out.append(
            _check(task, f"{name} top-1 >= {100 * top1:g}%", d["score"], top1, "target", d["score"] >= top1)
        )
        out.append(_check(task, f"{name} KL <= {kl:g}", d["kl"], kl, "target", d["kl"] <= kl, "nats"))
    elif task == "needle" and dense is not None:
        gap = target["gap"]
        for c in target["needle_contexts"]:
            if c in d["by_context"] and c in dense["by_context"]:
                mine, ref = d["by_context"][c], dense["by_context"][c]
                check = f"{name} within {100 * gap:g} points of uncompressed at {c}"
                out.append(_check(task, check, mine, ref, dense["method"], mine >= ref - gap - 1e-9))
    elif task == "multi_turn" and dense is not None and target["turns"]:
        check = f"{name} >= uncompressed"
        out.append(
            _check(task, check, d["score"], dense["score"], dense["method"], d["score"] >= dense["score"])
        )
    return out


def goal_checks(summary: dict[str, list[dict]]) -> list[dict]:
    """Goals per task and budget.

    DMS >= every press at the same budget; the targets of :data:`TARGETS` for the budget labels
    it names (other labels, and tasks without a target, check DMS@cr4 within 5 points of
    uncompressed).
    """
    checks = []
    for task, rows in summary.items():
        dense = next((r for r in rows if r["family"] == "dense"), None)
        for d in (r for r in rows if r["family"] == "dms" and r["method"].startswith("dms@")):
            presses = [r for r in rows if r["family"] == "kvpress" and r["budget"] == d["budget"]]
            best = max(presses, key=lambda r: r["score"], default=None)
            if best is not None:
                check = f"{d['method']} >= best press at {d['budget']}"
                # both at zero says nothing about the methods (the task beats the model)
                ok = None if d["score"] == best["score"] == 0 else d["score"] >= best["score"]
                checks.append(_check(task, check, d["score"], best["score"], best["method"], ok))
            targeted = _target_checks(task, d, dense, TARGETS[d["budget"]]) if d["budget"] in TARGETS else []
            checks += targeted
            if not targeted and dense is not None and d["budget"] == "cr4":
                check = f"{d['method']} within 5 points of uncompressed"
                ok = d["score"] >= dense["score"] - 0.05
                checks.append(_check(task, check, d["score"], dense["score"], dense["method"], ok))
    return checks


def _value(x: float, unit: str) -> str:
    return f"{x:.3f}" if unit == "nats" else f"{x:.2f}" if unit == "x" else _pct(x)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci: list[float]) -> str:
    return f"{100 * ci[0]:.0f}\u2013{100 * ci[1]:.0f}"


def _run_line(meta: dict, records: list[dict]) -> str:
    """How many rounds the tables hold and what they cost, ending with what produced them.

    A run resumed over several legs reports its methods' run time summed over every round, and the
    last leg's wall time and command (an earlier leg's command is not recorded).
    """
    done = meta["rounds_completed"]
    method_min = sum(r.get("seconds", 0.0) for r in records) / 60
    if meta.get("from_partial"):
        total = meta.get("config", {}).get("rounds", "?")
        return (
            f"the first {done} of {total} rounds of an unfinished run "
            f"({method_min:.1f} min of method runs), rendered by"
        )
    first = meta.get("resumed_after_round") or 0
    if first:
        return (
            f"{done} round(s) run in legs ({method_min:.1f} min of method runs in all); the last leg "
            f"resumed after round {first} and took {meta['seconds'] / 60:.1f} min. Its command"
        )
    return f"{done} round(s), {meta['seconds'] / 60:.1f} min. Command"


def render_markdown(results: dict) -> str:
    """The full comparison as markdown: one table per task, then the goal checks."""
    meta, summary = results["meta"], summarize(results["records"])
    lines = [
        f"Model: {meta['model']} ({meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}); "
        f"{_run_line(meta, results['records'])}: `{meta['command']}`.",
        "",
        "Kept tokens are counted at question time (after the last input segment; mean over layers and "
        "KV heads). Presses compress the long first segment at prefill and are matched per sample to the "
        "DMS model of the same budget (`@cr4`, `@cr8`); CR = input tokens / kept tokens. KV MiB is what the "
        "cache holds (DMSPress masks entries but keeps them in memory). Retrieval accuracies carry "
        "Wilson 95% intervals over the n answers: differences inside them are noise.",
        "",
    ]
    for task, rows in summary.items():
        contexts = sorted({c for r in rows for c in r["by_context"]})
        fid = task == "fidelity"
        head = ["method", "n", "top-1 agree %" if fid else "accuracy % (95% CI)"]
        head += ["KL (nats)", "ppl"] if fid else []
        head += [f"@{c}" for c in contexts] if len(contexts) > 1 else []
        head += ["CR", "kept tokens", "KV MiB"]
        lines += [
            f"### {TASK_TITLES.get(task, task)}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for r in rows:
            score = _pct(r["score"]) if fid else f"{_pct(r['score'])} ({_ci(r['ci95'])})"
            cells = [r["method"], str(r["n"]), score]
            cells += [f"{r['kl']:.4f}", f"{r['ppl']:.2f}"] if fid else []
            cells += (
                [_pct(r["by_context"].get(c, float("nan"))) for c in contexts] if len(contexts) > 1 else []
            )
            cells += [f"{r['compression_ratio']:.2f}", f"{r['kept_tokens']:.0f}", f"{r['kv_mib']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        infeasible = sum(r["infeasible"] for r in rows)
        if infeasible:
            lines.append(
                f"\n{infeasible} press run(s) could not reach the budget (the appended "
                "segments alone exceed it)."
            )
        lines.append("")
    checks = goal_checks(summary)
    if checks:
        lines += ["### Goal checks", "", "| task | check | DMS | other | result |", "|---|---|---|---|---|"]
        for c in checks:
            lines.append(
                f"| {c['task']} | {c['check']} | {_value(c['dms'], c['unit'])} | "
                f"{_value(c['other'], c['unit'])} ({c['other_method']}) "
                f"| {'n/a (both 0)' if c['pass'] is None else 'pass' if c['pass'] else 'FAIL'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_pareto(task: str, rows: list[dict], path: str) -> None:
    """Accuracy (or top-1 agreement) against KV MiB held, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "black", "dms": "tab:green", "kvpress": "tab:blue"}
    markers = {"cr4": "o", "cr8": "s", None: "*"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        fp8 = "fp8" in r["method"]
        ax.scatter(
            r["kv_mib"],
            100 * r["score"],
            c="tab:olive" if fp8 else colors.get(r["family"], "gray"),
            marker=markers.get(r["budget"], "^"),
            s=70 if r["family"] != "kvpress" else 40,
            zorder=3,
        )
        ax.annotate(
            r["method"],
            (r["kv_mib"], 100 * r["score"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("KV cache held at question time (MiB, log scale)")
    ax.set_ylabel("top-1 agreement with uncompressed (%)" if task == "fidelity" else "accuracy (%)")
    ax.set_title(TASK_TITLES.get(task, task), fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir: str) -> dict[str, str]:
    """Write ``comparison.md``, ``summary.json`` and ``pareto_<task>.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results["records"])
    paths = {"markdown": os.path.join(out_dir, "comparison.md")}
    atomic_write_text(paths["markdown"], render_markdown(results))
    paths["summary"] = os.path.join(out_dir, "summary.json")
    atomic_write_json(
        paths["summary"],
        {"summary": summary, "goal_checks": goal_checks(summary), "meta": results["meta"]},
        indent=1,
    )
    for task, rows in summary.items():
        paths[f"pareto_{task}"] = os.path.join(out_dir, f"pareto_{task}.png")
        plot_pareto(task, rows, paths[f"pareto_{task}"])
    return paths


def update_readme(readme: str, markdown: str, plots: list[str], block: str = "comparison") -> None:
    """Replace the text between the ``<!-- {block}:start/end -->`` markers of ``readme`` (atomically)."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    with open(readme) as f:
        text = f.read()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block to replace")
    pre, rest = text.split(start, 1)
    _, post = rest.split(end, 1)
    images = "\n".join(f"![{os.path.basename(p)}]({p})" for p in plots)
    block = f"{start}\n{markdown}\n{images}\n{end}"
    atomic_write_text(readme, pre + block + post)
