"""Side-by-side comparison: uncompressed vs DMS (+FP8 KV) vs kvpress presses, one process.

Work is done in *rounds*: round ``r`` evaluates sample ``r`` of every task cell with every method,
so every method always sees the same samples, and a runtime budget simply stops after the last
round that fits (the first round always runs). Samples depend only on the round index, so a run is
resumable: after every round the records so far go to ``results.partial.json`` in the output folder,
and a later run of the same comparison (same model, settings and adapter tensors) continues after
the last finished round instead of starting again.

Methods form *groups* that share their inputs: the uncompressed reference, and per budget label the
DMS heads of that label with every press at that budget (presses match the DMS kept-token count).
Each group has its own key, so new heads for one label recompute only that label's group in the
finished rounds; the other groups' records are kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..corpus import DEFAULT_CACHE_DIR, build_token_sequences, split_token_stream
from ..export.adapters import load_adapters
from ..fileio import atomic_write_json, file_sha256
from ..loading import load_model
from ..model_dms import quantize_fp8
from .config import EvalConfig
from .methods import DenseMethod, DMSMethod, PressMethod
from .metrics import mean_kl, needle_recall, perplexity, top1_agreement
from .shared_prefill import SharedPrefill
from .tasks import EvalSample, make_fidelity_sample, make_multi_turn_sample, make_needle_sample

__all__ = [
    "PARTIAL_NAME",
    "build_methods",
    "comparison_key",
    "comparison_keys",
    "evaluate_sample",
    "results_from_partial",
    "run_comparison",
    "save_results",
    "task_cells",
]

PARTIAL_NAME = "results.partial.json"
# Settings that change how many rounds run or where they go, not what one round computes.
_NOT_IN_KEY = ("rounds", "time_budget_min", "out_dir", "threads")


def build_methods(base, tokenizer, cfg: EvalConfig, calib: list[torch.Tensor] | None = None) -> list:
    """Uncompressed, then DMS (and DMS+FP8 KV) per adapters label, then every press at every budget.

    ``base`` stays unmodified (presses hook it); DMS models are copies.
    """
    methods: list = [DenseMethod(base, tokenizer)]
    for label, path in cfg.adapters.items():
        model = load_adapters(copy.deepcopy(base), path)
        model.eval()
        methods.append(DMSMethod(model, tokenizer, f"dms@{label}", label))
        if label in cfg.fp8_kv:
            if not calib:
                raise ValueError("DMS + FP8 KV needs calibration batches")
            q = load_adapters(copy.deepcopy(base), path)
            quantize_fp8(q, calib, weights=False, kv_cache=True)
            q.eval()
            methods.append(DMSMethod(q, tokenizer, f"dms+fp8kv@{label}", label))
    shared = SharedPrefill(base)  # one recorded prefill per sample for every press
    for label, cr in cfg.budgets.items():
        for press in cfg.presses:
            methods.append(
                PressMethod(base, tokenizer, press, label, cr, window=cfg.press_window, shared=shared)
            )
    return methods


def task_cells(cfg: EvalConfig) -> list[tuple[str, int]]:
    """``(task, context_tokens)`` cells; one sample of each per round.

    Needle depths are cycled over rounds (round ``r`` uses ``needle_depths[r % n]``), so ``n``
    rounds cover every (length, depth) pair once.
    """
    cells = [("fidelity", c) for c in cfg.fidelity_contexts]
    cells += [("needle", c) for c in cfg.needle_contexts]
    cells += [("multi_needle", c) for c in cfg.multi_needle_contexts]
    cells += [("multi_turn", c) for c in cfg.multi_turn_contexts]
    return cells


def _make_sample(cell, rnd: int, tokenizer, stream: list[int], windows: dict, cfg: EvalConfig) -> EvalSample:
    task, ctx = cell
    seed = random.Random(f"{cfg.seed}/{task}/{ctx}/{rnd}").randrange(2**31)
    if task == "fidelity":
        rows = windows[ctx]
        return make_fidelity_sample(rows[rnd % rows.shape[0]], ctx, f"fidelity/{ctx}/{rnd}")
    if task == "needle":
        depth = cfg.needle_depths[rnd % len(cfg.needle_depths)]
        return make_needle_sample(tokenizer, stream, ctx, 1, seed, depth=depth)
    if task == "multi_needle":
        return make_needle_sample(tokenizer, stream, ctx, cfg.n_needles, seed)
    return make_multi_turn_sample(tokenizer, stream, ctx, seed)


def evaluate_sample(
    sample: EvalSample, methods: list, tokenizer, on_method: Callable[[str], None] | None = None
) -> list[dict]:
    """Run every method on ``sample`` (the first must be the uncompressed reference).

    DMS methods run before presses so that presses can match their kept tokens per budget.
    """
    records, reference, dms_kept = [], None, {}
    for method in methods:
        t0 = time.time()
        target = dms_kept.get(method.budget) if method.family == "kvpress" else None
        res = method.run(sample, kept_target=target)
        rec: dict[str, Any] = {
            "task": sample.task,
            "sample": sample.key,
            "context_tokens": sample.context_tokens,
            "depths": [round(d, 4) for d in sample.depths],
            "method": method.name,
            "family": method.family,
            "budget": method.budget,
            "input_tokens": res.input_tokens,
            "kept_tokens": round(res.kept_tokens, 2),
            "compression_ratio": round(res.input_tokens / max(res.kept_tokens, 1e-9), 4),
            "kv_bytes": res.kv_bytes,
            "target_kept": None if res.target_kept is None else round(res.target_kept, 2),
            "budget_feasible": res.feasible,
            "seconds": round(time.time() - t0, 3),
        }
        if method.family == "dms" and method.name.startswith("dms@"):
            dms_kept[method.budget] = res.kept_tokens
        if sample.scored is not None:
            if reference is None:
                reference = res.scored_logits
            rec["kl"] = mean_kl(reference, res.scored_logits)
            rec["top1"] = top1_agreement(reference, res.scored_logits)
            rec["ppl"] = perplexity(res.scored_logits[:-1], sample.scored[0, 1:])
            rec["score"] = rec["top1"]
        else:
            answer = tokenizer.decode(res.generated, skip_special_tokens=True)
            rec["answer"] = answer
            rec["expected"] = sample.answers
            rec["score"] = needle_recall(answer, sample.answers)
        records.append(rec)
        if on_method is not None:
            on_method(method.name)
    return records


def run_comparison(
    cfg: EvalConfig,
    model_name: str = "smollm2-135m",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Load the model once, build every method, run rounds until done or out of time.

    Returns (and the caller writes) ``{"meta": ..., "records": [...]}``; see
    :mod:`modelopt_dms.evaluation.report` for the tables and plots.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    base, tok = load_model(model_name)
    base.eval()
    stream = split_token_stream(tok, cfg.text_glob, "heldout", cfg.heldout_fraction, cfg.seed)
    windows = {
        c: build_token_sequences(
            tok,
            cfg.text_glob,
            c + cfg.continuation_tokens,
            "heldout",
            cfg.heldout_fraction,
            cfg.seed,
            max_sequences=cfg.rounds,
            cache_dir=DEFAULT_CACHE_DIR,
        )
        for c in cfg.fidelity_contexts
    }
    calib = None
    if cfg.fp8_kv:
        calib_rows = build_token_sequences(
            tok,
            cfg.text_glob,
            512,
            "train",
            cfg.heldout_fraction,
            cfg.seed,
            max_sequences=cfg.calib_sequences,
            cache_dir=DEFAULT_CACHE_DIR,
        )
        calib = [row.unsqueeze(0) for row in calib_rows]
    methods = build_methods(base, tok, cfg, calib)
    cells = task_cells(cfg)
    log(f"[eval] {len(methods)} methods x {len(cells)} task cells x up to {cfg.rounds} rounds")
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    key, keys = comparison_keys(cfg, model_name)
    partial_path = os.path.join(cfg.out_dir, PARTIAL_NAME)
    records, done = _resume(partial_path, key, keys, cfg.rounds, log)
    first = min(done.values())
    runs_per_round = len(cells) * len(methods)
    bar = tqdm(
        total=cfg.rounds * runs_per_round, initial=first * runs_per_round, disable=not progress, unit="run"
    )
    round_s, last_runs = 0.0, 1
    for rnd in range(first, cfg.rounds):
        todo = {g for g, n in done.items() if n <= rnd}
        runs = sum(_group(m.budget) in todo for m in methods)  # a round may run only some groups
        elapsed = time.time() - t_start
        if rnd > first and budget_s is not None and elapsed + round_s * runs / last_runs > budget_s:
            log(
                f"[eval] stopping after {rnd} round(s): the next would pass the "
                f"{cfg.time_budget_min} min budget"
            )
            break
        t_round = time.time()
        for cell in cells:
            sample = _make_sample(cell, rnd, tok, stream, windows, cfg)
            bar.set_description(f"round {rnd + 1} {sample.key}")
            run = _methods_to_run(methods, todo, scored=sample.scored is not None)
            bar.update(len(methods) - len(run))  # the methods this round skips
            for rec in evaluate_sample(sample, run, tok, on_method=lambda _n: bar.update(1)):
                if _group(rec["budget"]) in todo:
                    records.append({**rec, "round": rnd})
        round_s, last_runs = time.time() - t_round, runs
        done.update({g: rnd + 1 for g in todo})
        _write_partial(partial_path, key, keys, done, records)
    bar.close()
    rounds_done = min(done.values())
    records = _in_order([r for r in records if r["round"] < rounds_done], cells, methods)
    methods_meta = [{"name": m.name, "family": m.family, "budget": m.budget} for m in methods]
    meta = _meta(cfg, model_name, key, rounds_done, first, time.time() - t_start, methods_meta)
    return {"meta": meta, "records": records}


def _meta(
    cfg: EvalConfig, model_name: str, key: str, rounds: int, first: int, seconds: float, methods: list[dict]
) -> dict:
    return {
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "model": model_name,
        "config": cfg.model_dump(),
        "rounds_completed": rounds,
        "resumed_after_round": first,
        "key": key,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "methods": methods,
        "heldout": f"held-out split of {cfg.text_glob} (distinct files, never trained on)",
    }


def results_from_partial(cfg: EvalConfig, model_name: str) -> dict | None:
    """The finished rounds of an unfinished run of this comparison (``results.partial.json``).

    None when there is no partial run of it (other settings or heads). ``seconds`` is the sum of
    the methods' run times; the partial file stays, so the same command still resumes.
    """
    state = _read_partial(os.path.join(cfg.out_dir, PARTIAL_NAME))
    key = comparison_key(cfg, model_name)
    if state is None or state["key"] != key or not state["records"]:
        return None
    records = [r for r in state["records"] if r.get("round", 0) < state["done"]]
    methods = list(dict.fromkeys((r["method"], r["family"], r["budget"]) for r in records))
    methods_meta = [{"name": m, "family": f, "budget": b} for m, f, b in methods]
    seconds = sum(r["seconds"] for r in records)
    meta = _meta(cfg, model_name, key, state["done"], 0, seconds, methods_meta)
    return {"meta": {**meta, "from_partial": True}, "records": records}


def save_results(results: dict, out_dir: str) -> str:
    """Write ``results.json`` atomically into ``out_dir``; returns its path.

    The round-by-round ``results.partial.json`` of the same comparison is removed once every
    requested round is in ``results.json``; a run stopped by its time budget keeps it, so the next
    run continues.
    """
    path = os.path.join(out_dir, "results.json")
    atomic_write_json(path, results, indent=1)
    meta = results.get("meta", {})
    partial = os.path.join(out_dir, PARTIAL_NAME)
    done = meta.get("rounds_completed", 0) >= meta.get("config", {}).get("rounds", 0)
    if done and (_read_partial(partial) or {}).get("key") == meta.get("key"):
        os.remove(partial)
    return path


def comparison_key(cfg: EvalConfig, model_name: str) -> str:
    """A digest of what one round computes (equal keys: records that a later run may reuse).

    The model, every setting but the round count, time budget, output folder and threads, and the
    bytes of every adapter file.
    """
    return comparison_keys(cfg, model_name)[0]


def comparison_keys(cfg: EvalConfig, model_name: str) -> tuple[str, dict[str, str]]:
    """:func:`comparison_key` and one digest per method group, hashing each adapter file once.

    The groups are ``uncompressed`` and each budget or adapters label. Every group key covers the
    model and settings; a label's key adds the bytes of that label's adapter files only, so other
    heads leave it unchanged.
    """
    settings = _settings(cfg, model_name)
    heads = {label: _heads_digest(folder) for label, folder in sorted(cfg.adapters.items())}
    groups = {_group(None): _digest(settings)}
    for label in sorted({*cfg.budgets, *cfg.adapters}):
        groups[label] = _digest({**settings, "group": label, "adapters": heads.get(label)})
    return _digest({**settings, "adapters": heads}), groups


def _settings(cfg: EvalConfig, model_name: str) -> dict:
    settings = {k: v for k, v in cfg.model_dump().items() if k not in _NOT_IN_KEY}
    return {"model": model_name, "settings": settings}


def _heads_digest(folder: str) -> dict[str, str]:
    """SHA-256 of every ``dms_adapters.*`` file in ``folder``."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("dms_adapters."))
    return {name: file_sha256(os.path.join(folder, name)) for name in names}


def _digest(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _group(budget: str | None) -> str:
    """The group of a method or record with this budget label (None: the uncompressed reference)."""
    return "uncompressed" if budget is None else budget


def _methods_to_run(methods: list, todo: set[str], scored: bool) -> list:
    """The methods of the groups in ``todo``, led by the uncompressed reference where needed.

    The reference runs for its own group, or to give a scored sample its reference logits.
    """
    dense, rest = methods[0], [m for m in methods[1:] if _group(m.budget) in todo]
    needs_dense = _group(dense.budget) in todo or (scored and bool(rest))
    return [dense, *rest] if needs_dense else rest


def _in_order(records: list[dict], cells: list[tuple[str, int]], methods: list) -> list[dict]:
    """Records by round, task cell and method, as an uninterrupted run writes them."""
    cell_at = {cell: i for i, cell in enumerate(cells)}
    method_at = {m.name: i for i, m in enumerate(methods)}
    return sorted(
        records,
        key=lambda r: (
            r["round"],
            cell_at.get((r["task"], r["context_tokens"]), len(cells)),
            method_at.get(r["method"], len(methods)),
        ),
    )


def _write_partial(
    path: str, key: str, keys: dict[str, str], done: dict[str, int], records: list[dict]
) -> None:
    groups = {g: {"key": keys[g], "rounds": done[g]} for g in keys}
    state = {"key": key, "rounds_completed": min(done.values()), "groups": groups, "records": records}
    atomic_write_json(path, state, indent=None)


def _read_partial(path: str) -> dict | None:
    """The partial run at ``path`` (key, rounds_completed, groups, records), or None if unreadable.

    ``groups`` maps each method group to its key and finished rounds; a file written before groups
    existed has none (``{}``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        done, records = int(state["rounds_completed"]), list(state["records"])
        groups = {
            str(g): {"key": str(v["key"]), "rounds": int(v["rounds"])}
            for g, v in state.get("groups", {}).items()
        }
        return {"key": state["key"], "done": done, "groups": groups, "records": records}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _resume(
    path: str, key: str, keys: dict[str, str], rounds: int, log: Callable[[str], None]
) -> tuple[list[dict], dict[str, int]]:
    """Records and the finished rounds per method group, from ``path`` if it holds this comparison.

    A group is reused where its key is unchanged; one whose heads changed starts from round 1 while
    the others keep their rounds. Other settings or another model: nothing is reused.
    """
    fresh = dict.fromkeys(keys, 0)
    if not os.path.isfile(path):
        return [], fresh
    state = _read_partial(path)
    if state is None:
        log(f"[eval] {path} is not a readable partial run: starting from round 1 (it will be replaced)")
        return [], fresh
    if state["key"] == key:
        done = {g: min(state["groups"].get(g, {}).get("rounds", state["done"]), rounds) for g in keys}
    else:
        old = state["groups"]
        same = {g for g in keys if g in old and old[g]["key"] == keys[g]}
        if _group(None) not in same:
            log(f"[eval] {path} is from another comparison (settings or heads differ): starting from round 1")
            return [], fresh
        done = {g: min(old[g]["rounds"], rounds) if g in same else 0 for g in keys}
        redo = sorted(g for g in keys if g not in same)
        log(
            f"[eval] {path}: the heads of {', '.join(redo)} changed; their methods are recomputed "
            f"from round 1, the other groups keep their finished rounds"
        )
    records = [r for r in state["records"] if r.get("round", 0) < done.get(_group(r.get("budget")), 0)]
    log(f"[eval] resuming after round {min(done.values())} of {rounds} ({len(records)} records from {path})")
    return records, done
