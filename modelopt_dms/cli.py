"""Command line: ``modelopt-dms demo`` (more subcommands arrive with training and export)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

__all__ = ["main"]

_PROMPT = (
    "Explain in three sentences why a smaller key-value cache lets a language model serve longer "
    "conversations on the same GPU."
)


def _log(msg: str) -> None:
    print(msg, flush=True)


DEFAULT_ADAPTERS = "artifacts/smollm2_135m_dms_cr4"


def run_demo(args: argparse.Namespace) -> dict:
    """The main job: DMS on the embedded SmolLM2-135M with the committed trained heads.

    Shows the conversion is exact with eviction off, then compares the trained DMS model with the
    uncompressed model on held-out real text (KL, token match, achieved compression, KV bytes) and
    on a passkey retrieval prompt, and a chat answer generated through the compact cache.
    """
    import os

    import modelopt_dms as dms
    from modelopt_dms.evaluation import fidelity_on_text, make_passkey_sample, passkey_accuracy
    from modelopt_dms.loading import load_model
    from modelopt_dms.training.data import PYTHON_DOCS_GLOB, build_token_sequences

    torch.manual_seed(0)
    t0 = time.time()
    _log(f"[1/5] loading {args.model} (GGUF, dequantised to fp32) ...")
    model, tok = load_model(args.model)
    msgs = [{"role": "user", "content": _PROMPT}]
    enc = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt")
    with torch.inference_mode():
        ref_logits = model(**enc).logits

    _log("[2/5] applying the 'dms' mode and loading the trained decision heads ...")
    if args.adapters and os.path.isdir(args.adapters):
        dms.load_adapters(model, args.adapters)
        heads = args.adapters
    else:
        model = dms.apply_dms(model, {"window_size": args.window})
        heads = "untrained (no adapters found: run `modelopt-dms run recipes/smollm2_135m_dms_cr4.yaml`)"
    window = dms.dms_modules(model)[0]._dms.window_size
    with torch.inference_mode(), dms.eviction_disabled(model):
        diff_off = (model(**enc).logits - ref_logits).abs().max().item()
    _log(f"      heads: {heads}; window {window}")
    _log(f"      eviction disabled -> max |logit diff| vs the original model = {diff_off:.2e}")

    result: dict = {
        "model": args.model,
        "heads": heads,
        "window_size": window,
        "max_abs_diff_eviction_off": diff_off,
    }
    try:
        text = build_token_sequences(
            tok,
            PYTHON_DOCS_GLOB,
            args.context,
            "heldout",
            max_sequences=1,
            cache_dir=".cache/modelopt_dms/data",
        )
        filler = build_token_sequences(
            tok, PYTHON_DOCS_GLOB, 4096, "heldout", max_sequences=1, cache_dir=".cache/modelopt_dms/data"
        )[0].tolist()
    except (FileNotFoundError, ValueError) as err:
        _log(f"      no held-out text ({err}); skipping the text and passkey checks")
        text, filler = None, None

    if text is not None:
        _log(f"[3/5] fidelity on {args.context} held-out tokens of the Python docs (never trained on) ...")
        r = fidelity_on_text(model, text, window, generate_tokens=args.new_tokens)
        _log(
            f"      achieved compression {r.compression_ratio:.2f}x (window included): KV "
            f"{r.kv_bytes_allocated / 2**20:.1f} MiB allocated vs {r.kv_bytes_dense / 2**20:.1f} MiB dense"
        )
        _log(
            f"      KL(dense || DMS) = {r.kl_per_token:.4f} nats/token; teacher-forced greedy match "
            f"{r.token_match:.1%} over {r.generated_tokens} tokens; "
            f"ppl {r.ppl_teacher:.2f} -> {r.ppl_student:.2f}"
        )
        result["fidelity"] = r.to_dict()
        _log(f"[4/5] passkey retrieval at {args.context} tokens, depths 0.2/0.5/0.8 ...")
        samples = [make_passkey_sample(tok, filler, args.context, d, seed=7) for d in (0.2, 0.5, 0.8)]
        got = passkey_accuracy(model, tok, samples)
        with dms.eviction_disabled(model):
            base = passkey_accuracy(model, tok, samples)
        _log(
            f"      DMS {got['accuracy']:.0%} (CR {got['compression_ratio']:.2f}) "
            f"vs uncompressed {base['accuracy']:.0%}"
        )
        _log(f"      answers: DMS {got['answers']} | uncompressed {base['answers']}")
        result["passkey"] = {
            "dms": got["accuracy"],
            "uncompressed": base["accuracy"],
            "compression_ratio": got["compression_ratio"],
        }

    _log("[5/5] a chat answer generated through the compact DMSCache ...")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True
        )
    answer = tok.decode(out.sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    _log(f"      Q: {_PROMPT}\n      A: {answer}")
    result["answer"] = answer
    result["seconds"] = round(time.time() - t0, 1)
    _log(f"done in {result['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run_recipe(path: str, progress: bool = True) -> dict:
    """Run a YAML recipe end to end: load, apply DMS, tokenise real text, train, save adapters."""
    import os

    import modelopt_dms as dms
    from modelopt_dms.loading import load_model
    from modelopt_dms.recipe import load_recipe
    from modelopt_dms.training.chat_data import mix_chat_sequences
    from modelopt_dms.training.data import build_token_sequences
    from modelopt_dms.training.trainer import TrainConfig, train

    recipe = load_recipe(path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun: data parallel over gloo (CPU) or nccl (GPU)
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    out_dir = recipe.output.dir
    os.makedirs(out_dir, exist_ok=True)
    _log(f"[recipe] {path} -> {out_dir}")
    dtype = getattr(torch, recipe.model.dtype)
    model, tok = load_model(recipe.model.name_or_path, dtype=dtype)
    model = dms.apply_dms(model, recipe.dms_config())
    d = recipe.data
    seqs = build_token_sequences(
        tok, d.text_glob, d.seq_len, "train", d.heldout_fraction, d.seed, d.max_sequences, d.cache_dir
    )
    seqs = mix_chat_sequences(tok, seqs, d.chat_fraction, d.recall_fraction, seed=d.seed)
    _log(
        f"[data] {seqs.shape[0]} training sequences of {seqs.shape[1]} tokens "
        f"(chat {d.chat_fraction:.0%}, recall {d.recall_fraction:.0%})"
    )
    cfg = TrainConfig(**recipe.train.model_dump())
    t0 = time.time()
    history = train(model, seqs, cfg, out_dir, progress=progress)
    elapsed = time.time() - t0
    adapters_dir = recipe.output.adapters_dir or os.path.join(out_dir, "adapters")
    if rank != 0:
        return {"rank": rank}
    dms.save_adapters(model, adapters_dir)
    exported = _quantize_and_export(model, tok, recipe, seqs)
    summary = {
        "recipe": path,
        "steps": cfg.steps,
        "train_seconds": round(elapsed, 1),
        "tokens": cfg.steps * cfg.grad_accum * cfg.batch_size * seqs.shape[1],
        "final": history[-1] if history else None,
        "adapters": adapters_dir,
        **exported,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _log(f"[done] {json.dumps(summary)}")
    return summary


def _quantize_and_export(model, tok, recipe, seqs) -> dict:
    """Apply the recipe's quantize and export sections (if any); returns what was written."""
    import modelopt_dms as dms

    out: dict = {}
    e = recipe.export
    if e is not None and e.onnx_path:  # floating-point step graph: before quantization
        from modelopt_dms.onnx_export import export_onnx

        export_onnx(model, e.onnx_path)
        _log(f"[export] ONNX step graph -> {e.onnx_path}")
        out["onnx_path"] = e.onnx_path
    q = recipe.quantize
    if q is not None and (q.weights == "fp8" or q.kv_cache == "fp8"):
        calib = [seqs[i : i + 1] for i in range(min(q.calib_sequences, seqs.shape[0]))]
        _log(f"[quantize] FP8 weights={q.weights} kv_cache={q.kv_cache}, {len(calib)} calibration sequences")
        model = dms.quantize_fp8(model, calib, weights=q.weights == "fp8", kv_cache=q.kv_cache == "fp8")
        out["quantized"] = {"weights": q.weights, "kv_cache": q.kv_cache}
    if e is not None and e.hf_dir:
        dms.export_hf_checkpoint(model, e.hf_dir, tokenizer=tok, overwrite=e.overwrite)
        _log(f"[export] unified HF checkpoint -> {e.hf_dir}")
        out["hf_dir"] = e.hf_dir
    return out


def run_export(args: argparse.Namespace) -> dict:
    """``modelopt-dms export``: model (+ trained adapters) -> optional FP8 -> HF export (+ ONNX)."""
    import modelopt_dms as dms
    from modelopt_dms.loading import load_model

    model, tok = load_model(args.model)
    if args.adapters:
        dms.load_adapters(model, args.adapters)
    else:
        model = dms.apply_dms(model, {"window_size": args.window})
        _log("[export] no --adapters given: exporting untrained DMS heads (they evict nothing)")
    result = {}
    if args.onnx:  # the ONNX step graph is floating point: export it before quantizing
        from modelopt_dms.onnx_export import export_onnx

        export_onnx(model, args.onnx)
        _log(f"[export] ONNX step graph -> {args.onnx}")
        result["onnx_path"] = args.onnx
    if args.quantize != "none":
        from modelopt_dms.training.data import build_token_sequences

        seqs = build_token_sequences(tok, args.calib_glob, 256, "train", max_sequences=args.calib_sequences)
        calib = [seqs[i : i + 1] for i in range(seqs.shape[0])]
        model = dms.quantize_fp8(model, calib, weights=args.quantize == "fp8", kv_cache=True)
    dms.export_hf_checkpoint(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    _log(f"[export] unified HF checkpoint -> {args.out}")
    result["hf_dir"] = args.out
    return result


def run_eval(args: argparse.Namespace) -> dict:
    """``modelopt-dms eval RECIPE``: the recipe's ``eval`` section, side by side, with tables and plots."""
    from modelopt_dms.evaluation.harness import run_comparison, save_results
    from modelopt_dms.evaluation.report import render_markdown, update_readme, write_report
    from modelopt_dms.recipe import RecipeError, load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.eval is None:
        raise RecipeError(f"Recipe {args.recipe} has no eval section; see recipes/eval_smollm2_135m.yaml")
    cfg = recipe.eval
    updates = {}
    if args.time_budget_min is not None:
        updates["time_budget_min"] = args.time_budget_min
    if args.rounds is not None:
        updates["rounds"] = args.rounds
    if args.out is not None:
        updates["out_dir"] = args.out
    try:
        cfg = type(cfg).model_validate({**cfg.model_dump(), **updates})
    except ValueError as err:
        raise RecipeError(f"Invalid eval option: {err}") from err
    if args.report_only:  # re-render tables, plots and the README block from a finished run
        path = os.path.join(cfg.out_dir, "results.json")
        if not os.path.isfile(path):
            raise RecipeError(f"--report-only: no {path}; run the evaluation first")
        with open(path) as f:
            results = json.load(f)
    else:
        for label, path in cfg.adapters.items():
            if not os.path.isdir(path):
                raise RecipeError(f"eval.adapters.{label}: {path} is not a directory of DMS adapters")
        results = run_comparison(cfg, recipe.model.name_or_path, progress=not args.no_progress, log=_log)
        save_results(results, cfg.out_dir)
    paths = write_report(results, cfg.out_dir)
    print(render_markdown(results))
    if args.readme:
        plots = [p for k, p in paths.items() if k.startswith("pareto_")]
        update_readme(
            args.readme, render_markdown(results), [os.path.relpath(p) for p in plots], args.readme_block
        )
        _log(f"[eval] updated the comparison section of {args.readme}")
    _log(f"[eval] results in {cfg.out_dir}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``modelopt-dms`` command."""
    parser = argparse.ArgumentParser(prog="modelopt-dms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="convert the embedded SmolLM2-135M and show DMS at work")
    demo.add_argument("--model", default="smollm2-135m", help="name, local HF directory or .gguf file")
    demo.add_argument("--adapters", default=DEFAULT_ADAPTERS, help="trained DMS adapters directory")
    demo.add_argument("--window", type=int, default=64, help="window when no adapters are found")
    demo.add_argument("--context", type=int, default=2048, help="held-out text / passkey context tokens")
    demo.add_argument("--new-tokens", type=int, default=64)
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")
    run = sub.add_parser("run", help="run a YAML recipe end to end (retrofit training)")
    run.add_argument("recipe", help="path to a recipe YAML file (see recipes/)")
    run.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("export", help="export a DMS model (optionally FP8) as a deployable checkpoint")
    exp.add_argument("--model", default="smollm2-135m", help="name, local HF directory or .gguf file")
    exp.add_argument("--adapters", default=None, help="trained DMS adapters dir (dms.save_adapters)")
    exp.add_argument("--window", type=int, default=64, help="window when no --adapters are given")
    exp.add_argument("--quantize", choices=["none", "fp8", "fp8-kv"], default="none")
    exp.add_argument("--calib-glob", default="/usr/share/doc/python3*/html/_sources/**/*.rst.txt")
    exp.add_argument("--calib-sequences", type=int, default=16)
    exp.add_argument("--out", required=True, help="export folder (must be new or empty)")
    exp.add_argument("--onnx", default=None, help="also write the ONNX step graph here")
    exp.add_argument("--overwrite", action="store_true")
    ev = sub.add_parser("eval", help="compare uncompressed, DMS and kvpress presses (recipe eval section)")
    ev.add_argument("recipe", help="recipe YAML with an eval section (see recipes/eval_smollm2_135m.yaml)")
    ev.add_argument("--time-budget-min", type=float, default=None, help="stop after the last round that fits")
    ev.add_argument("--rounds", type=int, default=None, help="override eval.rounds")
    ev.add_argument("--out", default=None, help="override eval.out_dir")
    ev.add_argument("--readme", default=None, help="replace the comparison block of this README")
    ev.add_argument("--readme-block", default="comparison", help="marker name of the README block")
    ev.add_argument("--report-only", action="store_true", help="re-render from OUT/results.json")
    ev.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "eval":
        from modelopt_dms.recipe import RecipeError

        try:
            run_eval(args)
        except RecipeError as err:
            print(str(err), file=sys.stderr)
            return 2
        return 0
    if args.command == "export":
        run_export(args)
        return 0
    if args.command == "demo":
        run_demo(args)
    elif args.command == "run":
        from modelopt_dms.recipe import RecipeError

        try:
            run_recipe(args.recipe, progress=not args.no_progress)
        except RecipeError as err:
            print(str(err), file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
