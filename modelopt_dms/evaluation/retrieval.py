"""Pass-key retrieval for one model: the comparison's single-needle task, run and scored the same way.

Samples come from :func:`~modelopt_dms.evaluation.tasks.make_needle_sample` (one needle), answers
from :class:`~modelopt_dms.evaluation.methods.DMSMethod` (greedy decoding through a fresh
:class:`~modelopt_dms.cache.DMSCache`), scores from :func:`~modelopt_dms.evaluation.metrics.needle_recall`.
Run it under :func:`modelopt_dms.eviction_disabled` for the uncompressed baseline.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from .methods import DMSMethod
from .metrics import needle_recall, wilson_interval
from .tasks import EvalSample, make_needle_sample

__all__ = ["passkey_accuracy", "passkey_samples"]


def passkey_samples(
    tokenizer, stream: list[int], contexts: list[int], depths: list[float], seeds: int = 1, seed: int = 0
) -> list[EvalSample]:
    """One pass-key sample per (context length, depth, seed index), deterministic from ``seed``."""
    samples = []
    for ctx in contexts:
        for depth in depths:
            for i in range(seeds):
                s = random.Random(f"{seed}/passkey/{ctx}/{depth}/{i}").randrange(2**31)
                samples.append(make_needle_sample(tokenizer, stream, ctx, 1, s, depth=depth))
    return samples


@torch.inference_mode()
def passkey_accuracy(model: nn.Module, tokenizer, samples: list[EvalSample]) -> dict:
    """Greedy answers of a DMS model (its compact cache): accuracy (+ Wilson 95% interval), CR, KV bytes."""
    method = DMSMethod(model, tokenizer, "passkey")
    scores, crs, kv_bytes, answers = [], [], 0, []
    for s in samples:
        res = method.run(s)
        answer = tokenizer.decode(res.generated, skip_special_tokens=True)
        answers.append(answer)
        scores.append(needle_recall(answer, s.answers))
        crs.append(res.input_tokens / max(res.kept_tokens, 1e-9))
        kv_bytes += res.kv_bytes
    lo, hi = wilson_interval(sum(scores), len(samples))
    return {
        "accuracy": sum(scores) / max(1, len(samples)),
        "n": len(samples),
        "correct": int(sum(scores)),
        "ci95": [round(lo, 4), round(hi, 4)],
        "compression_ratio": sum(crs) / len(crs) if crs else 1.0,
        "kv_bytes_allocated": kv_bytes,
        "answers": answers,
    }
