#!/usr/bin/env python
"""Ablations at an equal token budget: train every variant of a base recipe, evaluate, one table.

A spec (YAML) names the base recipe, the evaluation and the variants, each a set of dotted
overrides of the base recipe::

    base: recipes/smollm2_135m_dms_cr4.yaml
    root: runs/ablation_cr4              # run folders, variant recipes, evaluations
    eval: [--contexts, "2048", --texts, "2", --passkey-contexts, "1024", "2048"]
    variants:
      base: {}
      window32: {dms.window_size: 32}
      lr1e-4: {train.lr: 0.0001}
      mixed_text: {data.text_glob: null, data.sources: {python-docs: 2, manpages: 1, debian-reference: 1}}
      overshoot: {select: true, train.cr_end: 5.0, train.snapshot_every: 25}

``select: true`` (the one key without a dot) trains with adapter snapshots and evaluates the
snapshot ``modelopt-dms select`` picks for the recipe's ``dms.target_compression_ratio`` (the
lowest KL among snapshots at or above it, scored on training-split text) instead of the last step.

Variants train the DMS adapters, optionally with LoRA deltas (``train.lora_rank``: saved with the
adapters and evaluated against the original model). An all-weights variant
(``train.train_all_weights: true``) is exported to ``<run>/export`` and that model is evaluated
against the original; its checkpoint (full weights and optimizer, ~1.6 GB for 135M) and export are
kept out of git by ``<root>/.gitignore`` (the runner writes it), so such a run must finish within
one session.

Every variant must train as many tokens as the base (steps x grad_accum x batch x seq_len), or the
runner refuses it with the numbers. Runs resume (a killed or cross-session ablation goes on where it
stopped; finished variants are not retrained), evaluations are kept per variant. Writes
``<out>.json``, ``<out>.md`` (tokens, CPU-hours and every metric per variant) and ``<out>.png``.

    .venv/bin/python benchmarks/ablate.py SPEC.yaml --out benchmarks/results/ablation/ablation_cr4.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import command_line, log, write_outputs

import modelopt_dms as dms  # noqa: F401  (registers the mode before recipes load models)
from modelopt_dms.fileio import atomic_write_json
from modelopt_dms.pipelines.train import run_recipe
from modelopt_dms.schema import read_recipe_mapping
from modelopt_dms.training.recipe import load_train_recipe

__all__ = ["apply_overrides", "load_spec", "main", "token_budget"]


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of the recipe mapping with ``section.key`` overrides set (``None`` removes a key)."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {p!r} is not a section")
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def recipe_overrides(variant: dict | None) -> dict:
    """The dotted recipe overrides of a variant (without its ``select`` switch)."""
    return {k: v for k, v in (variant or {}).items() if k != "select"}


def token_budget(recipe) -> int:
    """Tokens one run trains on: steps x grad_accum x batch_size x seq_len."""
    t = recipe.train
    return t.steps * t.grad_accum * t.batch_size * recipe.data.seq_len


def load_spec(path: str) -> dict:
    """Read and check an ablation spec (base, root, variants; eval optional)."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not {"base", "root", "variants"} <= set(spec):
        raise ValueError(f"{path}: an ablation spec needs base, root and variants")
    if not spec["variants"] or not all(isinstance(v, dict | type(None)) for v in spec["variants"].values()):
        raise ValueError(f"{path}: variants maps each name to a mapping of dotted overrides")
    return spec


def _variant_recipes(spec: dict) -> dict[str, Path]:
    """Write one recipe file per variant under ``root`` and check the equal token budget."""
    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    base_raw = read_recipe_mapping(spec["base"])  # with its own base: chain merged in
    base_tokens = None
    paths, all_weights = {}, []
    for name, overrides in spec["variants"].items():
        raw = apply_overrides(base_raw, recipe_overrides(overrides))
        raw.setdefault("output", {})
        raw["output"]["dir"] = str(root / name)
        raw["output"]["adapters_dir"] = str(root / name / "adapters")
        raw.pop("export", None)
        raw.pop("quantize", None)
        if raw.get("train", {}).get("train_all_weights"):  # only the exported model is the trained one
            raw["export"] = {"hf_dir": str(root / name / "export"), "overwrite": True}
            all_weights.append(name)
        path = root / f"{name}.yaml"
        text = yaml.safe_dump(raw, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        tokens = token_budget(load_train_recipe(path))
        base_tokens = base_tokens or tokens
        if tokens != base_tokens:
            raise ValueError(
                f"variant {name!r} trains {tokens} tokens, the first variant {base_tokens}: "
                "adjust its train.steps so every variant has the same budget"
            )
        paths[name] = path
    _untracked_large_files(root, all_weights)
    return paths


_IGNORE_HEADER = (
    "# written by benchmarks/ablate.py: full-weight checkpoints and exports (GBs) stay out of git"
)


def _untracked_large_files(root: Path, names: list[str]) -> None:
    """``<root>/.gitignore``: the checkpoints and exports of the all-weights variants ``names``."""
    ignore = root / ".gitignore"
    if ignore.exists() and not ignore.read_text().startswith(_IGNORE_HEADER):
        raise ValueError(
            f"{ignore} was not written by this runner; it is left alone. Move it away (the runner keeps "
            "the all-weights variants' checkpoints and exports out of git with its own) and rerun."
        )
    lines = [_IGNORE_HEADER] + [
        f"/{n}/{p}" for n in names for p in ("checkpoint*/", ".checkpoint*/", "export/")
    ]
    text = "\n".join(lines) + "\n"
    if names and (not ignore.exists() or ignore.read_text() != text):
        ignore.write_text(text)


def _heads_of(run_dir: Path, recipe) -> tuple[str, Path]:
    """``(kind, path)`` of what a run trained: its adapters, or its export when all weights trained."""
    if recipe.train.train_all_weights:
        return "exported", run_dir / "export"
    return "adapters", run_dir / "adapters"


def _heads_digest(kind: str, path: Path) -> str | None:
    """A hash of the trained tensors (None: not trained yet)."""
    if kind == "adapters":
        f = path / "dms_adapters.safetensors"
        return _tensors_digest(f) if f.exists() else None
    shards = sorted(path.glob("*.safetensors"))
    if not shards or not (path / "config.json").exists():
        return None
    h = hashlib.sha256()
    for shard in shards:
        h.update(_tensors_digest(shard).encode())
    return h.hexdigest()


def _train_seconds(run_dir: Path, tokens_per_step: int) -> float:
    """Training time of the whole run (all sessions), from the per-step throughput in its log."""
    log_file = run_dir / "train_log.jsonl"
    if not log_file.exists():
        return 0.0
    from modelopt_dms.training.trainer import training_seconds

    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return training_seconds(rows, tokens_per_step)


def _tensors_digest(path: Path) -> str:
    """A hash of the tensors in a safetensors file (its header order varies between writes)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(path).items()):
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _saved_evaluation(run_dir: Path, eval_args: list[str]) -> dict | None:
    """The evaluation kept in a run folder for ``eval_args`` (None: none, or made with other arguments)."""
    out = run_dir / "eval.json"
    if not out.exists():
        return None
    saved = json.loads(out.read_text())
    return saved if saved.get("eval_args") == eval_args and saved.get("adapters_sha256") else None


def _evaluate(run_dir: Path, eval_args: list[str], model: str, kind: str, heads: Path, digest: str) -> dict:
    """The heads evaluation of one variant, kept in its run folder and redone when the heads change.

    ``kind``: ``adapters`` (an adapters folder) or ``exported`` (an HF export folder); ``digest``:
    :func:`_heads_digest` of ``heads``.
    """
    saved = _saved_evaluation(run_dir, eval_args)
    if saved is not None and saved["adapters_sha256"] == digest:
        return saved
    import eval_heads

    out = run_dir / "eval.json"
    res = eval_heads.main(["--model", model, f"--{kind}", str(heads), *eval_args, "--out", str(out)])
    res = {**json.loads(json.dumps(res)), "adapters_sha256": digest, "eval_args": eval_args}
    atomic_write_json(out, res)
    return res


def _selected(recipe_path: Path, recipe, run_dir: Path) -> tuple[Path, dict]:
    """``(adapters, chosen)``: the snapshot ``modelopt-dms select`` picks for the variant's target.

    Chosen once; chosen again only when the run has other snapshots than at the last selection.
    """
    from modelopt_dms.pipelines.select import select_from_recipe
    from modelopt_dms.training.selection import list_snapshots

    out = run_dir / "selected"
    target = recipe.dms.target_compression_ratio
    record_file = run_dir / f"selection_cr{target:g}.json"
    steps = [s for s, _ in list_snapshots(run_dir)]
    if record_file.exists() and (out / "dms_adapters.safetensors").exists():
        record = json.loads(record_file.read_text())
        if [s["step"] for s in record["snapshots"]] == steps:
            return out, record["chosen"]
    record = select_from_recipe(str(recipe_path), target, str(out), log=log)
    return out, record["chosen"]


def _row(name: str, overrides: dict, recipe, run_dir: Path, ev: dict, threads: int) -> dict:
    t = recipe.train
    tokens_per_step = t.grad_accum * t.batch_size * recipe.data.seq_len
    seconds = _train_seconds(run_dir, tokens_per_step)
    entry = next(iter(ev["methods"].values()))
    fid = {src: by_ctx for src, by_ctx in entry["fidelity"].items()}
    kls = [r["kl_per_token"] for by_ctx in fid.values() for r in by_ctx.values()]
    return {
        "variant": name,
        "overrides": overrides,
        "tokens": token_budget(recipe),
        "train_seconds": round(seconds, 3),
        "cpu_hours": round(seconds * threads / 3600, 4),
        "fidelity": fid,
        "kl_mean": sum(kls) / len(kls) if kls else float("nan"),
        "passkey": entry["passkey"],
        "passkey_uncompressed": ev.get("passkey_uncompressed", {}),
    }


def render(rows: list[dict]) -> str:
    """One table: variant, budget, cost, achieved CR, KL and token match per source, pass keys."""
    sources = sorted({s for r in rows for s in r["fidelity"]})
    contexts = sorted({c for r in rows for c in r["passkey"]}, key=int)
    head = ["variant", "overrides", "tokens", "CPU-h", "CR"]
    head += [f"KL {s}" for s in sources] + ["KL mean", "token match"]
    head += [f"pass key @{c} (95% CI)" for c in contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_src = [
            next(iter(r["fidelity"][s].values()), None) if s in r["fidelity"] else None for s in sources
        ]
        crs = [x["compression_ratio"] for x in per_src if x]
        match = [x["token_match"] for x in per_src if x]
        cells = [r["variant"], ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(base)"]
        cells += [str(r["tokens"]), f"{r['cpu_hours']:.2f}", f"{sum(crs) / len(crs):.2f}" if crs else "-"]
        cells += [f"{x['kl_per_token']:.4f}" if x else "-" for x in per_src]
        cells += [f"{r['kl_mean']:.4f}", f"{sum(match) / len(match):.3f}" if match else "-"]
        for c in contexts:
            p = r["passkey"].get(c)
            cells.append(
                f"{p['correct']}/{p['n']} ({100 * p['ci95'][0]:.0f}\u2013{100 * p['ci95'][1]:.0f})"
                if p
                else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    unc = rows[0]["passkey_uncompressed"] if rows else {}
    if unc:
        lines.append("")
        lines.append(
            "Uncompressed pass keys: "
            + ", ".join(f"@{c} {unc[c]['correct']}/{unc[c]['n']}" for c in sorted(unc, key=int))
        )
    return "\n".join(lines)


def plot(rows: list[dict], png: str) -> None:
    """Mean KL against achieved CR, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        crs = [x["compression_ratio"] for by_ctx in r["fidelity"].values() for x in by_ctx.values()]
        cr = sum(crs) / len(crs) if crs else float("nan")
        ax.scatter(cr, r["kl_mean"], s=50)
        ax.annotate(r["variant"], (cr, r["kl_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="achieved compression ratio", ylabel="mean KL over sources (nats/token)")
    ax.set_title("ablation at an equal token budget", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="ablation spec (YAML)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation/ablation.json"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run (for CPU-hours)")
    p.add_argument("--only", nargs="+", help="train/evaluate only these variants (the table shows all done)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    spec = load_spec(args.spec)
    recipes = _variant_recipes(spec)
    rows = []
    t0 = time.time()
    for name, path in recipes.items():
        recipe = load_train_recipe(path)
        run_dir = Path(recipe.output.dir)
        if args.only is None or name in args.only:
            log(f"[ablate] {name}: train {token_budget(recipe)} tokens -> {run_dir}")
            run_recipe(str(path), progress=False, log=log)
        kind, heads = _heads_of(run_dir, recipe)
        eval_args = [str(a) for a in spec.get("eval", [])]
        chosen = None
        variant = spec["variants"][name] or {}
        digest = _heads_digest(kind, heads)
        if digest is not None:
            if variant.get("select"):
                heads, chosen = _selected(path, recipe, run_dir)
                digest = _heads_digest(kind, heads)
            ev = _evaluate(run_dir, eval_args, recipe.model.name_or_path, kind, heads, digest)
        elif kind == "exported" and (ev := _saved_evaluation(run_dir, eval_args)) is not None:
            log(f"[ablate] {name}: export not here (kept out of git): the committed evaluation is used")
        else:
            log(f"[ablate] {name}: not trained yet (left out of the table)")
            continue
        row = _row(name, recipe_overrides(variant), recipe, run_dir, ev, args.threads)
        if chosen is not None:
            row["selected"] = chosen
        rows.append(row)
    table = render(rows)
    print(table)
    payload = {"command": command_line(), "spec": spec, "seconds": round(time.time() - t0, 1), "rows": rows}
    md = f"# Ablation ({os.path.basename(args.spec)})\n\nCommand: `{payload['command']}`\n\n{table}\n"
    write_outputs(args.out.parent, args.out.stem, payload, md, lambda png: plot(rows, png))
    return payload


if __name__ == "__main__":
    main()
