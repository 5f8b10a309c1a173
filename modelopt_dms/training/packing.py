"""Sequence packing with document boundaries.

Documents (token lists) are packed greedily into rows of ``seq_len`` tokens; a document longer than
a row is split into row-sized pieces (each piece is its own document). Per row, ``doc_ids`` numbers
the documents (``-1`` for padding at the end of the last row). For a forward pass, :func:`row_inputs`
turns a batch of packed rows into

* ``position_ids`` that restart at 0 for every document (RoPE sees each document alone);
* a 4D additive attention mask, block-diagonal and causal: a token sees only earlier tokens of its
  own document (padding sees nothing).

The DMS attention reads the block structure from that mask: a key's eviction is governed by the
decision of the next token *of its document* (``d_{k+1}``); the last token of a document stays
pending, exactly as at the end of an unpacked row. A packed row therefore computes, per document,
what the documents run separately compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedRows", "pack_documents", "row_inputs"]


@dataclass
class PackedRows:
    """Packed training rows: ``input_ids`` and ``doc_ids``, both ``(N, seq_len)`` int64."""

    input_ids: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def shape(self) -> torch.Size:  # noqa: D102
        return self.input_ids.shape

    def __getitem__(self, rows) -> PackedRows:
        return PackedRows(self.input_ids[rows], self.doc_ids[rows])


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int = 0) -> PackedRows:
    """Pack ``docs`` in order into rows of ``seq_len`` (long documents are cut into pieces)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pieces = [doc[i : i + seq_len] for doc in docs for i in range(0, len(doc), seq_len)]
    rows, row_docs, ids, dids = [], [], [], []
    for piece in pieces:
        if len(ids) + len(piece) > seq_len:
            rows.append(ids)
            row_docs.append(dids)
            ids, dids = [], []
        doc = dids[-1] + 1 if dids else 0
        ids.extend(piece)
        dids.extend([doc] * len(piece))
    if ids:
        rows.append(ids)
        row_docs.append(dids)
    if not rows:
        raise ValueError("pack_documents needs at least one non-empty document")
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    doc_ids = torch.full((n, seq_len), -1, dtype=torch.long)
    for i, (r, d) in enumerate(zip(rows, row_docs, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        doc_ids[i, : len(d)] = torch.tensor(d, dtype=torch.long)
    return PackedRows(input_ids, doc_ids)


def row_inputs(doc_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``position_ids`` restarting per document and the block-diagonal causal additive mask.

    Args:
        doc_ids: ``(B, T)`` on the model's device (``-1``: padding).
        dtype: dtype of the additive mask (the model's compute dtype).

    Returns:
        ``{"position_ids": (B, T), "attention_mask": (B, 1, T, T)}`` and ``valid`` ``(B, T)`` bool.

    """
    bsz, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device)
    real = doc_ids >= 0
    new_doc = torch.ones_like(real)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(-1).values  # first index of the doc
    position_ids = torch.where(real, idx - start, torch.zeros_like(idx))
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    visible = same & (idx[None, :, None] >= idx[None, None, :]) & real[:, :, None] & real[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=doc_ids.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=doc_ids.device)
    mask = torch.where(visible, zero, neg)[:, None]
    return {"position_ids": position_ids, "attention_mask": mask, "valid": real}
