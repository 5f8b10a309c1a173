"""Passkey retrieval: a 5-digit key hidden in real filler text, asked for at the end."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..cache import DMSCache, cache_stats

__all__ = ["PasskeySample", "make_passkey_sample", "passkey_accuracy"]


@dataclass
class PasskeySample:
    """One retrieval prompt (chat-formatted token ids) and its answer."""

    input_ids: torch.Tensor
    passkey: str
    depth: float
    context_tokens: int


def make_passkey_sample(
    tokenizer, filler_ids: list[int], context_tokens: int, depth: float, seed: int
) -> PasskeySample:
    """Hide ``The pass key is NNNNN.`` at relative ``depth`` of ``context_tokens`` filler tokens."""
    rng = random.Random(seed)
    key = f"{rng.randint(10000, 99999)}"
    start = rng.randint(0, max(0, len(filler_ids) - context_tokens - 1))
    filler = filler_ids[start : start + context_tokens]
    if len(filler) < context_tokens:
        raise ValueError(f"need {context_tokens} filler tokens, the corpus gave {len(filler)}")
    cut = int(len(filler) * depth)
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    text = tokenizer.decode(filler[:cut]) + needle + tokenizer.decode(filler[cut:])
    msgs = [
        {
            "role": "user",
            "content": "There is a pass key hidden in the following text. Find it and remember it.\n\n"
            + text
            + "\n\nWhat is the pass key? Answer with the 5-digit number only.",
        }
    ]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return PasskeySample(ids, key, depth, context_tokens)


@torch.inference_mode()
def passkey_accuracy(
    model: nn.Module, tokenizer, samples: list[PasskeySample], max_new_tokens: int = 10
) -> dict:
    """Greedy answers through a fresh :class:`DMSCache` per sample; correct when the 5 digits appear.

    Run it under :func:`modelopt_dms.eviction_disabled` for the uncompressed baseline. Returns
    accuracy, mean achieved compression ratio, KV bytes (allocated and dense) and the answers.
    """
    correct, crs, alloc, dense, answers = 0, [], 0, 0, []
    for s in samples:
        out = model.generate(
            input_ids=s.input_ids,
            attention_mask=torch.ones_like(s.input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            past_key_values=DMSCache(),
        )
        text = out.sequences[0, s.input_ids.shape[1] :]
        answer = tokenizer.decode(text, skip_special_tokens=True)
        answers.append(answer)
        correct += int(s.passkey in "".join(re.findall(r"\d", answer)))
        st = cache_stats(out.past_key_values)
        crs.append(st["compression_ratio"])
        alloc += st["kv_bytes_allocated"]
        dense += st["kv_bytes_dense"]
    return {
        "accuracy": correct / max(1, len(samples)),
        "n": len(samples),
        "compression_ratio": sum(crs) / len(crs) if crs else 1.0,
        "kv_bytes_allocated": alloc,
        "kv_bytes_dense": dense,
        "answers": answers,
    }
