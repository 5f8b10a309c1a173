"""The real-text corpus shared by training, evaluation, the demo and the benchmarks.

Documents are files matching a glob, split into train and held-out *by file* (deterministic from
a seed), tokenised, and cut into fixed-length rows (one document per row) cached on disk, or
concatenated into one long token stream (filler for long-context tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import torch
from safetensors.torch import load_file

from .fileio import atomic_save_safetensors
from .text_sources import SOURCES, read_source

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_HELDOUT_FRACTION",
    "DEFAULT_SPLIT_SEED",
    "MIN_DOC_CHARS",
    "PYTHON_DOCS_GLOB",
    "build_documents",
    "build_mixture_documents",
    "build_mixture_sequences",
    "mixture_counts",
    "build_token_sequences",
    "read_text_files",
    "split_token_stream",
]

PYTHON_DOCS_GLOB = SOURCES["python-docs"].patterns[0]  # Debian's python3-doc
DEFAULT_CACHE_DIR = ".cache/modelopt_dms/data"  # tokenised rows, keyed by every argument
DEFAULT_HELDOUT_FRACTION = 0.05  # share of files in the held-out split
DEFAULT_SPLIT_SEED = 0
MIN_DOC_CHARS = 2000  # shorter files are skipped


def read_text_files(
    pattern: str, min_chars: int = MIN_DOC_CHARS, cache_dir: str | None = None
) -> list[tuple[str, str]]:
    """Sorted distinct ``(path, text)`` documents of a named source or a glob, skipping short ones.

    Files reached through several paths and repeated texts are read once, and license texts
    never (:func:`~modelopt_dms.text_sources.read_source`), so no held-out document also sits in
    the train split under another name.
    """
    docs = read_source(pattern, cache_dir)
    return [(p, text) for p, text in docs if len(text) >= min_chars]


def _fingerprint(docs: list[tuple[str, str]]) -> str:
    """A short hash of the documents' paths and lengths (token caches follow corpus changes)."""
    listing = "\n".join(f"{p}\t{len(t)}" for p, t in docs)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _split(docs: list[tuple[str, str]], heldout_fraction: float, seed: int) -> dict[str, list]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(docs) * heldout_fraction))
    held = set(order[:n_held])
    return {
        "train": [d for i, d in enumerate(docs) if i not in held],
        "heldout": [d for i, d in enumerate(docs) if i in held],
    }


def build_token_sequences(
    tokenizer,
    pattern: str,
    seq_len: int,
    split: str = "train",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    max_sequences: int | None = None,
    cache_dir: str | None = None,
) -> torch.Tensor:
    """``(N, seq_len)`` token ids; every sequence is cut from ONE document (no cross-document packing).

    Documents are split into train/held-out by file (deterministic from ``seed``); the result is
    cached as safetensors under ``cache_dir`` keyed by all arguments and the tokenizer vocabulary.
    """
    docs = read_text_files(pattern, cache_dir=cache_dir)
    key = json.dumps(
        [
            pattern,
            seq_len,
            split,
            heldout_fraction,
            seed,
            max_sequences,
            len(docs),
            _fingerprint(docs),
            tokenizer.vocab_size,
            getattr(tokenizer, "name_or_path", ""),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokens-{split}-{digest}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        return load_file(path)["input_ids"]
    seqs = []
    for _, text in _split(docs, heldout_fraction, seed)[split]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            seqs.append(ids[start : start + seq_len])
    if not seqs:
        raise ValueError(f"No document in the {split} split has {seq_len} tokens; lower seq_len.")
    random.Random(seed + 1).shuffle(seqs)
    if max_sequences is not None:
        seqs = seqs[:max_sequences]
    out = torch.tensor(seqs, dtype=torch.long)
    if path:
        atomic_save_safetensors({"input_ids": out}, path)
    return out


def build_documents(
    tokenizer,
    pattern: str,
    split: str = "train",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    cache_dir: str | None = None,
) -> list[list[int]]:
    """Every document of one split, tokenised whole (in a seeded order), for packing."""
    docs = _split(read_text_files(pattern, cache_dir=cache_dir), heldout_fraction, seed)[split]
    out = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in docs]
    random.Random(seed + 1).shuffle(out)
    return out


def split_token_stream(
    tokenizer,
    pattern: str,
    split: str = "heldout",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    cache_dir: str | None = None,
) -> list[int]:
    """All documents of one split, tokenised and concatenated (blank line between documents).

    Long-context filler for generated tasks; the split is the same as :func:`build_token_sequences`.
    """
    docs = _split(read_text_files(pattern, cache_dir=cache_dir), heldout_fraction, seed)[split]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for _, text in docs:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
    return stream


def mixture_counts(available: dict[str, int], weights: dict[str, float], total: int | None) -> dict[str, int]:
    """How many items to take from each source so that the shares follow ``weights``.

    ``total`` (None: as many as the scarcest source allows at its share) is split in proportion
    to the weights; a source with too few items raises, naming it and what it holds.
    """
    if not weights or any(w <= 0 for w in weights.values()):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    norm = sum(weights.values())
    share = {k: w / norm for k, w in weights.items()}
    if total is None:
        total = int(min(available[k] / share[k] for k in share))
    counts = {k: int(share[k] * total) for k in share}
    for k in sorted(share, key=lambda k: -share[k])[: total - sum(counts.values())]:
        counts[k] += 1  # hand the rounding remainder to the largest shares
    for k, n in counts.items():
        if n > available[k]:
            raise ValueError(
                f"source {k!r} has {available[k]} items in this split but the mixture needs {n}: "
                "lower max_sequences, its weight or seq_len"
            )
    return counts


def build_mixture_sequences(
    tokenizer,
    sources: dict[str, float],
    seq_len: int,
    split: str = "train",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    max_sequences: int | None = None,
    cache_dir: str | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Rows from several sources (names or globs) in the proportions of ``sources``' weights.

    Each source is split into train/held-out by its own files, so every held-out set stays clean.
    Returns the shuffled ``(N, seq_len)`` rows and the number of rows taken from each source.
    """
    per = {
        name: build_token_sequences(tokenizer, name, seq_len, split, heldout_fraction, seed, None, cache_dir)
        for name in sources
    }
    counts = mixture_counts({k: v.shape[0] for k, v in per.items()}, sources, max_sequences)
    rows = torch.cat([per[k][: counts[k]] for k in sources])
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + 2))
    return rows[order], counts


def build_mixture_documents(
    tokenizer,
    sources: dict[str, float],
    split: str = "train",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    cache_dir: str | None = None,
) -> tuple[list[list[int]], dict[str, int]]:
    """Whole documents of several sources for packing, with token shares following the weights.

    Returns the documents (seeded order) and the tokens taken from each source.
    """
    per = {
        name: build_documents(tokenizer, name, split, heldout_fraction, seed, cache_dir) for name in sources
    }
    tokens = {k: sum(len(d) for d in docs) for k, docs in per.items()}
    budget = mixture_counts(tokens, sources, None)
    out: list[list[int]] = []
    taken = {}
    for name, docs in per.items():
        left = budget[name]
        for doc in docs:
            if left <= 0:
                break
            out.append(doc[:left])
            left -= len(out[-1])
        taken[name] = budget[name] - max(left, 0)
    random.Random(seed + 2).shuffle(out)
    return out, taken
