"""``modelopt-dms demo`` (``make demo``): DMS on the embedded SmolLM2-135M with the committed heads.

Shows that the conversion is exact with eviction off, then compares the trained DMS model with
the uncompressed model on held-out real text (KL, top-1 agreement, achieved compression, KV bytes)
and on pass-key prompts (the comparison's single-needle task, scored by the same rule), and
generates a chat answer through the compact cache.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..corpus import DEFAULT_CACHE_DIR, PYTHON_DOCS_GLOB, build_token_sequences, split_token_stream
from ..evaluation.fidelity import fidelity_on_text
from ..evaluation.retrieval import passkey_accuracy, passkey_samples
from ..export.adapters import check_adapters, load_adapters
from ..fileio import atomic_write_json
from ..loading import load_model
from ..model_dms import apply_dms, dms_config, eviction_disabled

__all__ = ["DEFAULT_ADAPTERS", "DemoOptions", "run_demo"]

DEFAULT_ADAPTERS = "artifacts/smollm2_135m_dms_cr4"
PROMPT = (
    "Explain in three sentences why a smaller key-value cache lets a language model serve longer "
    "conversations on the same GPU."
)
PASSKEY_DEPTHS = (0.2, 0.5, 0.8)


@dataclass
class DemoOptions:
    """What the demo runs on (the CLI flags of ``modelopt-dms demo``)."""

    model: str = "smollm2-135m"
    adapters: str | None = DEFAULT_ADAPTERS
    window: int = 64  # used only without adapters
    context: int = 2048
    new_tokens: int = 64
    json: str | None = None
    text_glob: str = PYTHON_DOCS_GLOB  # held-out files of this corpus are the real text


def run_demo(opts: DemoOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns (and optionally writes to ``opts.json``) the measured results."""
    torch.manual_seed(0)
    t0 = time.time()
    record = check_adapters(opts.adapters) if opts.adapters else None  # a typo: before the model loads
    log(f"[1/5] loading {opts.model} ...")
    model, tok = load_model(opts.model)
    msgs = [{"role": "user", "content": PROMPT}]
    enc = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt")
    with torch.inference_mode():
        ref_logits = model(**enc).logits

    log("[2/5] applying the 'dms' mode and loading the trained decision heads ...")
    reference = None  # the uncompressed model: the DMS model itself under eviction_disabled ...
    if opts.adapters:
        if "lora" in record:  # ... unless LoRA deltas merge into its weights: then the original
            reference = apply_dms(copy.deepcopy(model), record["dms_config"])
        load_adapters(model, opts.adapters)
        heads = opts.adapters
    else:
        model = apply_dms(model, {"window_size": opts.window})
        heads = "untrained (no --adapters: they evict nothing)"
    window = dms_config(model).window_size
    uncompressed = model if reference is None else reference
    with torch.inference_mode(), eviction_disabled(uncompressed):
        diff_off = (uncompressed(**enc).logits - ref_logits).abs().max().item()
    log(f"      heads: {heads}; window {window}")
    log(f"      eviction disabled -> max |logit diff| vs the original model = {diff_off:.2e}")
    result: dict[str, Any] = {
        "model": opts.model,
        "heads": heads,
        "window_size": window,
        "max_abs_diff_eviction_off": diff_off,
    }
    try:
        text = build_token_sequences(
            tok, opts.text_glob, opts.context, "heldout", max_sequences=1, cache_dir=DEFAULT_CACHE_DIR
        )
        stream = split_token_stream(tok, opts.text_glob, "heldout")
    except (FileNotFoundError, ValueError) as err:
        log(f"      no held-out text ({err}); skipping the text and pass-key checks")
        text, stream = None, None

    if text is not None:
        log(f"[3/5] fidelity on {opts.context} held-out tokens of real text (never trained on) ...")
        r = fidelity_on_text(model, text, window, generate_tokens=opts.new_tokens, reference=reference)
        log(
            f"      achieved compression {r.compression_ratio:.2f}x (window included): KV "
            f"{r.kv_bytes_allocated / 2**20:.1f} MiB allocated vs {r.kv_bytes_dense / 2**20:.1f} MiB dense"
        )
        log(
            f"      KL(dense || DMS) = {r.kl_per_token:.4f} nats/token; teacher-forced top-1 agreement "
            f"{r.token_match:.1%} over {r.generated_tokens} tokens; "
            f"ppl {r.ppl_teacher:.2f} -> {r.ppl_student:.2f}"
        )
        result["fidelity"] = r.to_dict()
        depths = "/".join(f"{d:g}" for d in PASSKEY_DEPTHS)
        log(f"[4/5] pass-key retrieval at {opts.context} tokens, depths {depths} ...")
        samples = passkey_samples(tok, stream, [opts.context], list(PASSKEY_DEPTHS), seed=7)
        got = passkey_accuracy(model, tok, samples)
        with eviction_disabled(uncompressed):
            base = passkey_accuracy(uncompressed, tok, samples)
        log(
            f"      DMS {got['correct']}/{got['n']} (CR {got['compression_ratio']:.2f}) vs uncompressed "
            f"{base['correct']}/{base['n']}"
        )
        log(f"      answers: DMS {got['answers']} | uncompressed {base['answers']}")
        result["passkey"] = {
            "dms": got["accuracy"],
            "uncompressed": base["accuracy"],
            "n": got["n"],
            "compression_ratio": got["compression_ratio"],
        }

    log("[5/5] a chat answer generated through the compact DMSCache ...")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=opts.new_tokens, do_sample=False, return_dict_in_generate=True
        )
    answer = tok.decode(out.sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    log(f"      Q: {PROMPT}\n      A: {answer}")
    result["answer"] = answer
    result["seconds"] = round(time.time() - t0, 1)
    log(f"done in {result['seconds']} s")
    if opts.json:
        atomic_write_json(Path(opts.json), result)
    return result
