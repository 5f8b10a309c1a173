"""Chat-formatted training sequences for instruct models, built from real-text token rows.

Two kinds, both exactly ``seq_len`` tokens and both inside the model's own chat template:

* **continuation**: the user turn holds the first part of a document, the assistant turn
  continues it (the rest of the same row);
* **recall**: the user turn holds real filler text with one or two short facts ("needles")
  hidden at random depths and asks for one of them; the assistant answers. The distillation
  target at the answer tokens rewards decisions that keep the needle's keys and values.

The recall templates are deliberately different from the passkey evaluation
(:mod:`modelopt_dms.evaluation.retrieval`), so that evaluation is not done on training prompts.
"""

from __future__ import annotations

import random

import torch

__all__ = ["RECALL_TEMPLATES", "mix_chat_sequences"]

_FILL = "\x00FILL\x00"

# (statement, question); {v} is the value. None of these mention a "pass key".
RECALL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("The secret code is {v}.", "What is the secret code?"),
    ("Remember this number: {v}.", "Which number were you asked to remember?"),
    ("The access token for the build server is {v}.", "What is the access token for the build server?"),
    ("Note: the room number for the meeting is {v}.", "What is the room number for the meeting?"),
    ("The order id you need later is {v}.", "What is the order id?"),
)


def _template_parts(tokenizer, user: str, assistant: str) -> list[list[int]]:
    """Token ids of the rendered chat template, split at each ``_FILL`` placeholder."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        tokenize=False,
    )
    return [tokenizer(part, add_special_tokens=False)["input_ids"] for part in text.split(_FILL)]


def _continuation(tokenizer, row: list[int], seq_len: int) -> list[int]:
    head, mid_ids, end_ids = _template_parts(tokenizer, "Continue this text:\n\n" + _FILL, _FILL)
    budget = seq_len - len(head) - len(mid_ids) - len(end_ids)
    if budget < 8:
        raise ValueError(f"seq_len {seq_len} is too short for a chat continuation sample")
    user_n = budget // 2
    body = row[:budget]
    return head + body[:user_n] + mid_ids + body[user_n:] + end_ids


def _recall(tokenizer, row: list[int], seq_len: int, rng: random.Random) -> list[int]:
    n_needles = rng.choice((1, 1, 2))
    picks = rng.sample(range(len(RECALL_TEMPLATES)), n_needles)
    values = [str(rng.randint(10 ** (d - 1), 10**d - 1)) for d in (rng.randint(4, 7) for _ in picks)]
    asked = rng.randrange(n_needles)
    question = RECALL_TEMPLATES[picks[asked]][1]
    head, tail = _template_parts(
        tokenizer, "Read the text and answer the question after it.\n\n" + _FILL, values[asked]
    )
    q_ids = tokenizer("\n\nQuestion: " + question, add_special_tokens=False)["input_ids"]
    needles = [
        tokenizer("\n" + RECALL_TEMPLATES[p][0].format(v=v) + "\n", add_special_tokens=False)["input_ids"]
        for p, v in zip(picks, values, strict=True)
    ]
    budget = seq_len - len(head) - len(tail) - len(q_ids) - sum(len(n) for n in needles)
    if budget < 8:
        raise ValueError(f"seq_len {seq_len} is too short for a chat recall sample")
    filler = row[:budget]
    cuts = sorted(rng.randint(0, budget) for _ in needles)
    body, prev = [], 0
    for cut, needle in zip(cuts, needles, strict=True):
        body += filler[prev:cut] + needle
        prev = cut
    body += filler[prev:]
    return head + body + q_ids + tail


def mix_chat_sequences(
    tokenizer,
    sequences: torch.Tensor,
    chat_fraction: float,
    recall_fraction: float,
    seed: int = 0,
) -> torch.Tensor:
    """Replace a deterministic share of the real-text rows by chat continuation / recall samples.

    Each converted row keeps its length and draws its text from itself, so the split
    (train vs held-out documents) is preserved. ``chat_fraction + recall_fraction <= 1``.
    """
    if chat_fraction < 0 or recall_fraction < 0 or chat_fraction + recall_fraction > 1:
        raise ValueError(
            f"chat_fraction ({chat_fraction}) and recall_fraction ({recall_fraction}) must be >= 0 "
            "and sum to at most 1"
        )
    if not (chat_fraction or recall_fraction):
        return sequences
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template; set data.chat_fraction and "
            "data.recall_fraction to 0 for a base model."
        )
    n, seq_len = sequences.shape
    rng = random.Random(seed + 7)
    order = list(range(n))
    rng.shuffle(order)
    n_chat, n_recall = int(round(n * chat_fraction)), int(round(n * recall_fraction))
    out = sequences.clone()
    for i in order[:n_chat]:
        out[i] = torch.tensor(_continuation(tokenizer, sequences[i].tolist(), seq_len))
    for i in order[n_chat : n_chat + n_recall]:
        out[i] = torch.tensor(_recall(tokenizer, sequences[i].tolist(), seq_len, rng))
    return out
