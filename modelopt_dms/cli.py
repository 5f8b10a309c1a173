"""The ``modelopt-dms`` command: demo, run (train a recipe), export, eval.

This module only parses arguments; the jobs live in :mod:`modelopt_dms.pipelines`. Every
subcommand reports bad input (recipes, paths, destinations, configs) the same way: one message
naming the problem and the fix on stderr, exit code 2, no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import sys

from modelopt.torch.opt.conversion import ApplyModeError

from .corpus import PYTHON_DOCS_GLOB
from .pipelines.compare import run_eval
from .pipelines.demo import DEFAULT_ADAPTERS, DemoOptions, run_demo
from .pipelines.export import export_model
from .pipelines.select import select_from_recipe
from .pipelines.train import run_recipe
from .training.trainer import TrainingDivergedError

__all__ = ["build_parser", "main"]


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="modelopt-dms",
        description="Dynamic Memory Sparsification (learned KV-cache eviction) for Hugging Face decoders.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="DMS on the embedded SmolLM2-135M with the committed trained heads")
    demo.add_argument("--model", default="smollm2-135m", help="name, local HF directory or .gguf file")
    demo.add_argument("--adapters", default=DEFAULT_ADAPTERS, help="trained DMS adapters directory")
    demo.add_argument("--no-adapters", action="store_true", help="run untrained heads (they evict nothing)")
    demo.add_argument("--window", type=int, default=64, help="window of the untrained heads")
    demo.add_argument("--context", type=int, default=2048, help="held-out text / pass-key context tokens")
    demo.add_argument("--new-tokens", type=int, default=64)
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")

    run = sub.add_parser("run", help="run a training recipe end to end (retrofit, train, save, export)")
    run.add_argument("recipe", help="path to a training recipe YAML file (see recipes/)")
    run.add_argument("--restart", action="store_true", help="start over in an output.dir holding another run")
    run.add_argument("--no-progress", action="store_true")

    sel = sub.add_parser("select", help="pick a run's adapter snapshot for a target compression ratio")
    sel.add_argument("recipe", help="the training recipe of the run (its train.snapshot_every > 0)")
    sel.add_argument("--target", type=float, required=True, help="CR to reach (window included)")
    sel.add_argument("--out", required=True, help="adapters folder to write (dms.load_adapters reads it)")
    sel.add_argument("--context", type=int, default=2048, help="tokens per selection row")
    sel.add_argument("--rows", type=int, default=2, help="training-split rows the snapshots are scored on")
    sel.add_argument(
        "--calibrate",
        action="store_true",
        help="then move the decision threshold (logit_offset) so the CR on those rows is just above target",
    )
    sel.add_argument("--margin", type=float, default=0.05, help="calibrate to target x (1 + margin)")
    sel.add_argument(
        "--candidate-cr",
        type=float,
        default=None,
        help="with --calibrate: also calibrate snapshots that reach only this CR at their trained threshold "
        "(default: --target)",
    )
    sel.add_argument(
        "--from-step",
        type=int,
        default=0,
        help="score only the snapshots at this step or later (those a longer run added)",
    )

    exp = sub.add_parser("export", help="export a DMS model (optionally FP8) as a deployable checkpoint")
    exp.add_argument("--model", default="smollm2-135m", help="name, local HF directory or .gguf file")
    exp.add_argument("--adapters", default=None, help="trained DMS adapters dir (dms.save_adapters)")
    exp.add_argument("--window", type=int, default=64, help="window when no --adapters are given")
    exp.add_argument("--quantize", choices=["none", "fp8", "fp8-kv"], default="none")
    exp.add_argument("--calib-glob", default=PYTHON_DOCS_GLOB)
    exp.add_argument("--calib-sequences", type=int, default=16)
    exp.add_argument("--out", required=True, help="export folder (must be new or empty)")
    exp.add_argument("--onnx", default=None, help="also write the ONNX step graph here")
    exp.add_argument("--overwrite", action="store_true")

    ev = sub.add_parser(
        "eval",
        help="compare uncompressed, DMS and kvpress presses (an evaluation recipe)",
        description=(
            "Compare uncompressed, DMS and kvpress presses round by round. A stopped run resumes "
            "from results.partial.json in its output folder; new heads for one label recompute only "
            "that label's methods (its DMS heads and the presses at its budget)."
        ),
    )
    ev.add_argument("recipe", help="evaluation recipe YAML (see recipes/eval_smollm2_135m.yaml)")
    ev.add_argument("--time-budget-min", type=float, default=None, help="stop after the last round that fits")
    ev.add_argument("--rounds", type=int, default=None, help="override eval.rounds")
    ev.add_argument("--out", default=None, help="override eval.out_dir")
    ev.add_argument(
        "--results-doc",
        "--readme",
        dest="results_doc",
        default=None,
        help="replace the results block of this markdown file (docs/results.md)",
    )
    ev.add_argument("--readme-block", "--block", dest="block", default="comparison", help="block marker name")
    ev.add_argument("--report-only", action="store_true", help="re-render from OUT/results.json")
    ev.add_argument("--no-progress", action="store_true")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "demo":
        adapters = None if args.no_adapters else args.adapters
        opts = DemoOptions(args.model, adapters, args.window, args.context, args.new_tokens, args.json)
        run_demo(opts, _log)
    elif args.command == "run":
        run_recipe(args.recipe, progress=not args.no_progress, log=_log, restart=args.restart)
    elif args.command == "select":
        select_from_recipe(
            args.recipe,
            args.target,
            args.out,
            args.context,
            args.rows,
            log=_log,
            calibrate=args.calibrate,
            margin=args.margin,
            from_step=args.from_step,
            candidate_cr=args.candidate_cr,
        )
    elif args.command == "export":
        export_model(
            args.model,
            args.out,
            adapters=args.adapters,
            window=args.window,
            quantize=args.quantize,
            calib_glob=args.calib_glob,
            calib_sequences=args.calib_sequences,
            onnx=args.onnx,
            overwrite=args.overwrite,
            log=_log,
        )
    elif args.command == "eval":
        run_eval(
            args.recipe,
            args.time_budget_min,
            args.rounds,
            args.out,
            args.results_doc,
            args.block,
            args.report_only,
            progress=not args.no_progress,
            log=_log,
        )


# Errors that mean "the input (recipe, path, config, destination) cannot be used as given".
BAD_INPUT = (ValueError, OSError, ApplyModeError, TrainingDivergedError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``modelopt-dms`` command; returns the exit code (2: bad input)."""
    args = build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except BAD_INPUT as err:
        if args.debug:
            raise
        print(f"modelopt-dms {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"modelopt-dms {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
