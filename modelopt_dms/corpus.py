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
