"""``modelopt-dms eval RECIPE``: the side-by-side comparison, its tables, plots and results block."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ..evaluation.config import load_eval_recipe
from ..evaluation.harness import results_from_partial, run_comparison, save_results
from ..evaluation.report import render_markdown, update_readme, write_report
from ..schema import RecipeError

__all__ = ["run_eval"]


def run_eval(
    recipe_path: str,
    time_budget_min: float | None = None,
    rounds: int | None = None,
    out_dir: str | None = None,
    results_doc: str | None = None,
    block: str = "comparison",
    report_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or with ``report_only`` re-render) the recipe's comparison; returns the results.

    ``results_doc`` (e.g. ``docs/results.md``) gets its ``<!-- block:start/end -->`` block replaced.
    """
    recipe = load_eval_recipe(recipe_path)
    updates = {
        k: v
        for k, v in {"time_budget_min": time_budget_min, "rounds": rounds, "out_dir": out_dir}.items()
        if v is not None
    }
    try:
        cfg = type(recipe.eval).model_validate({**recipe.eval.model_dump(), **updates})
    except ValueError as err:
        raise RecipeError(f"Invalid eval option: {err}") from err
    if report_only:  # re-render from results.json, or from the finished rounds of a stopped run
        path = os.path.join(cfg.out_dir, "results.json")
        partial = results_from_partial(cfg, recipe.model.name_or_path)
        if partial is not None:
            rounds_done = partial["meta"]["rounds_completed"]
            log(
                f"[eval] {cfg.out_dir} holds an unfinished run: rendering its {rounds_done} finished "
                f"round(s) of {cfg.rounds} (the same command without --report-only resumes it)"
            )
            results = partial
            save_results(results, cfg.out_dir)
        elif not os.path.isfile(path):
            raise RecipeError(f"--report-only: no {path}; run the evaluation first")
        else:
            with open(path) as f:
                results = json.load(f)
    else:
        for label, path in cfg.adapters.items():
            if not os.path.isdir(path):
                raise RecipeError(f"eval.adapters.{label}: {path} is not a directory of DMS adapters")
        results = run_comparison(cfg, recipe.model.name_or_path, progress=progress, log=log)
        save_results(results, cfg.out_dir)
    paths = write_report(results, cfg.out_dir)
    markdown = render_markdown(results)
    print(markdown)
    if results_doc:
        plots = [p for k, p in paths.items() if k.startswith("pareto_")]
        doc_dir = os.path.dirname(os.path.abspath(results_doc))
        update_readme(results_doc, markdown, [os.path.relpath(p, doc_dir) for p in plots], block)
        log(f"[eval] updated the {block} block of {results_doc}")
    log(f"[eval] results in {cfg.out_dir}")
    return results
