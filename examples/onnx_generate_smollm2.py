"""SmolLM2-135M with DMS: export the ONNX step graph, generate greedily on ONNX Runtime, compare with PyTorch.

    python examples/onnx_generate_smollm2.py                       # untrained adapters: ~no eviction
    python examples/onnx_generate_smollm2.py --adapters runs/x/adapters   # trained adapters
    python examples/onnx_generate_smollm2.py --random-adapter-std 0.02    # random adapters: heavy
                                                                          # eviction; text degrades

Steps: load SmolLM2-135M-Instruct (``modelopt_dms.load_model("smollm2-135m")``), apply DMS (or load trained
adapters), export one generation step to ONNX (``modelopt_dms.export.onnx.export_onnx``), run greedy decoding
on ONNX Runtime with the driver's own compact cache (``OnnxDMSGenerator``), run the same greedy decoding in
PyTorch with ``DMSCache`` (``model.generate``), and compare tokens, per-step logits and per-row kept counts.
Fixed-pattern eviction (``modelopt_dms.fixed_eviction``) cannot be exported: the ONNX graph evaluates the
learned decision head only. Without trained adapters the head is untrained (logit -5 everywhere), so the
graph evicts (almost) nothing; ``--random-adapter-std`` draws random adapter weights instead so that tokens
really are evicted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import modelopt_dms as dms
from modelopt_dms.export.onnx import export_onnx
from modelopt_dms.export.onnx_runtime import OnnxDMSGenerator

PROMPT = (
    "Here is a short passage.\n\n"
    "The Python tutorial introduces the basic concepts and features of the language and system. It helps "
    "to have a Python interpreter handy for hands-on experience, but all examples are self-contained, so the "
    "tutorial can be read off-line as well. Python is an easy to learn, powerful programming language. It "
    "has efficient high-level data structures and a simple but effective approach to object-oriented "
    "programming. Python's elegant syntax and dynamic typing, together with its interpreted nature, make it "
    "an ideal language for scripting and rapid application development in many areas on most platforms.\n\n"
    "Summarise the passage in two sentences."
)


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", default=None, help="trained DMS adapters (modelopt_dms.save_adapters)")
    p.add_argument("--window", type=int, default=16, help="DMS window when no --adapters are given")
    p.add_argument("--random-adapter-std", type=float, default=0.0, help="random adapter weights (demo)")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--prefill-chunk", type=int, default=64, help="ORT prefill chunk size (0: one call)")
    p.add_argument("--out", default=None, help="folder for the .onnx file and report (default: temp)")
    p.add_argument("--json", default=None, help="report path (default: <out>/report.json)")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dms_onnx_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = dms.load_model(args.model)
    log(f"[1/5] loaded {args.model}: {type(model).__name__} in {time.perf_counter() - t0:.1f}s")

    if args.adapters:
        model = dms.load_adapters(model, args.adapters)
        source = f"trained adapters from {args.adapters}"
    else:
        model = dms.apply_dms(model, {"window_size": args.window})
        source = f"untrained adapters (window {args.window})"
        if args.random_adapter_std > 0:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for m in dms.dms_modules(model):
                    w = m.dms_adapter.proj.weight
                    w.copy_(torch.randn(w.shape, generator=gen) * args.random_adapter_std)
            source = f"RANDOM adapters std {args.random_adapter_std} (window {args.window}; demo only)"
    window = dms.dms_config(model).window_size
    log(f"[2/5] DMS applied: {source}")

    onnx_path = out_dir / "smollm2_dms_step.onnx"
    t1 = time.perf_counter()
    export_onnx(model, onnx_path, max_past=8192)
    export_s = time.perf_counter() - t1
    log(f"[3/5] ONNX step graph -> {onnx_path} ({onnx_path.stat().st_size / 2**20:.0f} MiB, {export_s:.1f}s)")

    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    model.generation_config.eos_token_id = None  # compare a fixed number of steps
    t2 = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    torch_s = time.perf_counter() - t2
    ref_tokens = ref.sequences[0, ids.shape[1] :].numpy()
    ref_logits = [x[0].float().numpy() for x in ref.logits]
    ref_stats = dms.cache_stats(ref.past_key_values)
    log(f"[4/5] PyTorch greedy with DMSCache: {args.new_tokens} tokens in {torch_s:.1f}s")

    runner = OnnxDMSGenerator(onnx_path, window_size=window, prefill_chunk_size=args.prefill_chunk or None)
    res = runner.generate(ids.numpy(), max_new_tokens=args.new_tokens)
    ort_tokens = res.tokens[0]
    diffs = [float(np.abs(a[0] - b).max()) for a, b in zip(res.step_logits, ref_logits, strict=True)]
    match = ort_tokens == ref_tokens
    first_mismatch = int(np.argmin(match)) if not match.all() else None
    kept_equal = bool(np.array_equal(res.tokens_kept, ref_stats["tokens_kept"].numpy()))
    decode_steps = max(args.new_tokens - 1, 1)
    log(
        f"[5/5] ONNX Runtime greedy: prefill {res.prefill_seconds:.2f}s "
        f"(chunk {args.prefill_chunk or 'all'}), decode {res.decode_seconds:.2f}s "
        f"({decode_steps / max(res.decode_seconds, 1e-9):.1f} tok/s)"
    )

    report = {
        "model": args.model,
        "dms": source,
        "window_size": window,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "onnx_path": str(onnx_path),
        "onnx_export_seconds": round(export_s, 2),
        "tokens_match": bool(match.all()),
        "token_match_fraction": float(match.mean()),
        "first_mismatch_step": first_mismatch,
        "max_abs_logit_diff_per_step": [round(d, 7) for d in diffs],
        "max_abs_logit_diff": max(diffs),
        "kept_counts_equal_pytorch": kept_equal,
        "ort_compression_ratio": res.compression_ratio,
        "pytorch_compression_ratio": ref_stats["compression_ratio"],
        "ort_tokens_kept_total": int(res.tokens_kept.sum()),
        "ort_tokens_seen_total": int(res.tokens_seen.sum()),
        "kv_bytes_kept": res.extra["kv_bytes_kept"],
        "kv_bytes_dense": res.extra["kv_bytes_dense"],
        "tokens_kept_per_layer_min_max": [
            [int(x.min()), int(x.max())] for x in res.tokens_kept.reshape(res.tokens_kept.shape[0], -1)
        ],
        "ort_prefill_seconds": round(res.prefill_seconds, 3),
        "ort_decode_seconds": round(res.decode_seconds, 3),
        "pytorch_generate_seconds": round(torch_s, 3),
        "text_onnxruntime": tok.decode(ort_tokens, skip_special_tokens=True),
        "text_pytorch": tok.decode(ref_tokens, skip_special_tokens=True),
    }
    json_path = Path(args.json) if args.json else out_dir / "report.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    log("\n=== report ===")
    log(f"tokens identical (ORT vs PyTorch): {report['tokens_match']} ({match.sum()}/{len(match)})")
    log(f"max |logit diff| over {len(diffs)} steps: {report['max_abs_logit_diff']:.2e}")
    log(f"per-row kept counts equal to PyTorch DMSCache: {kept_equal}")
    log(
        f"compression ratio (seen/kept, window included): ORT {res.compression_ratio:.3f}, "
        f"PyTorch {ref_stats['compression_ratio']:.3f} "
        f"({report['ort_tokens_seen_total']} seen / {report['ort_tokens_kept_total']} kept row-tokens)"
    )
    log(f"ORT text: {report['text_onnxruntime']!r}")
    log(f"report -> {json_path}")
    ok = report["tokens_match"] and kept_equal
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
