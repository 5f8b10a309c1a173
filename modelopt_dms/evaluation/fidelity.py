"""Fidelity of a DMS model to its uncompressed self on real text (KL, token match, perplexity)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..cache import DMSCache, cache_stats
from ..model_dms import eviction_disabled
from .metrics import kl_per_token, perplexity, top1_agreement

__all__ = ["FidelityResult", "fidelity_on_text"]


@dataclass
class FidelityResult:
    """Metrics of one text window (see :func:`fidelity_on_text`)."""

    context_tokens: int
    compression_ratio: float
    kv_bytes_allocated: int
    kv_bytes_dense: int
    kl_per_token: float
    kl_per_token_after_window: float
    ppl_teacher: float
    ppl_student: float
    token_match: float
    generated_tokens: int

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


@torch.inference_mode()
def fidelity_on_text(
    model: nn.Module,
    ids: torch.Tensor,
    window_size: int,
    generate_tokens: int = 64,
    prefill_chunk_size: int | None = 256,
    reference: nn.Module | None = None,
) -> FidelityResult:
    """Compare a DMS model (compact cache) with itself under ``eviction_disabled`` on ``ids`` (1, T).

    ``reference``: the uncompressed model to compare with instead (a DMS model, run under
    ``eviction_disabled``), for heads whose base weights changed in training (LoRA deltas merged):
    the original model, not the adapted one without eviction.

    * KL(teacher ‖ student) per token over the text (all positions, and positions past the window
      where eviction can matter), and both perplexities;
    * token match: the teacher greedily continues the text for ``generate_tokens`` tokens; the
      student, teacher-forced on that continuation through its compact cache, must predict the
      same argmax token at each step (no error cascade);
    * the achieved compression ratio and KV bytes of the student's cache after the text.
    """
    model.eval()
    ref = model if reference is None else reference.eval()
    with eviction_disabled(ref):
        teacher = ref(input_ids=ids, use_cache=False).logits
        cont = ref.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=generate_tokens,
            do_sample=False,
            min_new_tokens=generate_tokens,
        )[:, ids.shape[1] :]
        full = torch.cat([ids, cont], dim=1)
        teacher_cont = ref(input_ids=full, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    cache = DMSCache(prefill_chunk_size=prefill_chunk_size)
    student = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    stats = cache_stats(cache)
    student_cont = [student[:, -1:]]
    for t in range(cont.shape[1] - 1):
        out = model(input_ids=cont[:, t : t + 1], past_key_values=cache, use_cache=True)
        student_cont.append(out.logits)
    student_cont = torch.cat(student_cont, dim=1)
    kl = kl_per_token(teacher, student)[0]
    after = kl[window_size + 1 :] if kl.numel() > window_size + 1 else kl
    return FidelityResult(
        context_tokens=int(ids.shape[1]),
        compression_ratio=float(stats["compression_ratio"]),
        kv_bytes_allocated=int(stats["kv_bytes_allocated"]),
        kv_bytes_dense=int(stats["kv_bytes_dense"]),
        kl_per_token=float(kl.mean()),
        kl_per_token_after_window=float(after.mean()),
        ppl_teacher=perplexity(teacher[0, :-1], ids[0, 1:]),
        ppl_student=perplexity(student[0, :-1], ids[0, 1:]),
        token_match=top1_agreement(teacher_cont, student_cont),
        generated_tokens=int(cont.shape[1]),
    )
