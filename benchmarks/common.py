"""Helpers shared by the benchmark scripts: environment record, real text, cache bytes, outputs.

Every producer writes into its own folder under ``benchmarks/results/<name>/``: ``<stem>.json``
(everything measured plus the environment), ``<stem>.md`` (the table, with the command) and, where
a picture says more, ``<stem>.png``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modelopt_dms.corpus import DEFAULT_CACHE_DIR, PYTHON_DOCS_GLOB, split_token_stream  # noqa: E402
from modelopt_dms.fileio import atomic_write_json, atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MIB = 1024.0**2
# Llama-3.1-8B's decoder shape, for random-weight GPU runs (no model hub); layers set by the caller
LLAMA_8B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
)
# a tiny Llama-like shape (GQA 8 query / 4 KV heads) for CPU dry runs of the GPU benchmarks
SMALL_SHAPE = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "LLAMA_8B_SHAPE",
    "MIB",
    "PYTHON_DOCS_GLOB",
    "RESULTS",
    "SMALL_SHAPE",
    "command_line",
    "cpu_model",
    "dense_cache_bytes",
    "environment",
    "git_state",
    "log",
    "real_text_ids",
    "sync",
    "write_outputs",
]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    """Print a progress line immediately."""
    print(msg, flush=True)


def command_line() -> str:
    """The command that is running, shell-quoted (for the results files)."""
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO), *sys.argv])


def git_state() -> dict[str, Any]:
    """HEAD commit and uncommitted library files (the results depend on ``modelopt_dms/``)."""

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
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """Date, command, library versions, threads, CPU/GPU and git state of this run."""
    import transformers

    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "git": git_state(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def real_text_ids(tokenizer, n_tokens: int, split: str = "heldout") -> torch.Tensor:
    """``(1, n_tokens)`` ids of real English text (the python3-doc held-out files, concatenated)."""
    stream = split_token_stream(tokenizer, PYTHON_DOCS_GLOB, split)
    if len(stream) < n_tokens:
        stream = stream + split_token_stream(tokenizer, PYTHON_DOCS_GLOB, "train")
    if len(stream) < n_tokens:
        raise SystemExit(f"corpus too short: {len(stream)} tokens < {n_tokens}")
    return torch.tensor([stream[:n_tokens]], dtype=torch.long)


def dense_cache_bytes(cache) -> int:
    """Key/value tensor bytes held by a transformers cache (DynamicCache, StaticCache)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def write_outputs(folder: Path, stem: str, payload: dict[str, Any], markdown: str, plot=None) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` via ``plot(path)``) atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write_json(folder / f"{stem}.json", payload),
        atomic_write_text(folder / f"{stem}.md", markdown),
    ]
    if plot is not None:
        png = folder / f"{stem}.png"
        plot(png)
        paths.append(png)
    return paths
