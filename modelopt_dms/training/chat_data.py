"""Chat-formatted training sequences for instruct models, built from real-text token rows.

Three kinds, all exactly ``seq_len`` tokens and all inside the model's own chat template:

* **continuation**: the user turn holds the first part of a document, the assistant turn
  continues it (the rest of the same row);
* **recall**: the user turn holds real filler text with one or two short facts ("needles")
  hidden at random depths and asks for one of them; the assistant answers. The distillation
  target at the answer tokens rewards decisions that keep the needle's keys and values;
* **multi-turn recall**: the fact is a user turn of its own, acknowledged by the assistant; a
  later user turn holds the real text, and the last one asks for the fact. This is the shape of
  a conversation whose cache carries earlier turns.

The templates are deliberately different from the evaluation's pass keys and multi-turn task
(:mod:`modelopt_dms.evaluation.tasks`), so that evaluation is not done on training prompts.
"""

from __future__ import annotations

import random

import torch

__all__ = ["MULTI_TURN_TEMPLATES", "RECALL_TEMPLATES", "mix_chat_sequences"]

_FILL = "\x00FILL\x00"

# (statement, question); {v} is the value. None of these mention a "pass key".
RECALL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("The secret code is {v}.", "What is the secret code?"),
    ("Remember this number: {v}.", "Which number were you asked to remember?"),
    ("The access token for the build server is {v}.", "What is the access token for the build server?"),
    ("Note: the room number for the meeting is {v}.", "What is the room number for the meeting?"),
    ("The order id you need later is {v}.", "What is the order id?"),
)

# (the user's fact, the assistant's acknowledgement, the last turn's question); {v} is the value.
# None of these is the evaluation's locker code.
MULTI_TURN_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("My badge number is {v}. Keep it in mind.", "Noted.", "What was my badge number?"),
    (
        "The Wi-Fi password for today is {v}; I will need it later.",
        "Got it.",
        "What is today's Wi-Fi password?",
    ),
    ("Please note my flight number: {v}.", "I have noted your flight number.", "What is my flight number?"),
    ("Our project budget code is {v}.", "Understood, I will keep it.", "Which budget code did I give you?"),
)
_DOCUMENT_TURNS = (
    ("Now read this:\n\n" + _FILL, "Done reading."),
    ("Some text for you:\n\n" + _FILL + "\n\nThat is all of it.", "I have read it."),
)


def _chat_parts(tokenizer, turns: list[str]) -> list[list[int]]:
    """Token ids of a user / assistant / user ... conversation, split at each ``_FILL``."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return [tokenizer(part, add_special_tokens=False)["input_ids"] for part in text.split(_FILL)]


def _continuation(tokenizer, row: list[int], seq_len: int) -> list[int]:
    head, mid_ids, end_ids = _chat_parts(tokenizer, ["Continue this text:\n\n" + _FILL, _FILL])
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
    head, tail = _chat_parts(
        tokenizer, ["Read the text and answer the question after it.\n\n" + _FILL, values[asked]]
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


def _multi_turn_recall(tokenizer, row: list[int], seq_len: int, rng: random.Random) -> list[int]:
    statement, ack, question = MULTI_TURN_TEMPLATES[rng.randrange(len(MULTI_TURN_TEMPLATES))]
    digits = rng.randint(4, 7)
    value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    document, read = _DOCUMENT_TURNS[rng.randrange(len(_DOCUMENT_TURNS))]
    head, tail = _chat_parts(tokenizer, [statement.format(v=value), ack, document, read, question, value])
    budget = seq_len - len(head) - len(tail)
    if budget < 8:
        raise ValueError(f"seq_len {seq_len} is too short for a multi-turn recall sample")
    return head + row[:budget] + tail


def mix_chat_sequences(
    tokenizer,
    sequences: torch.Tensor,
    chat_fraction: float,
    recall_fraction: float,
    seed: int = 0,
    multi_turn_fraction: float = 0.0,
) -> torch.Tensor:
    """Replace a deterministic share of the real-text rows by chat-formatted samples.

    Continuation, recall and multi-turn recall rows, in that order of the shuffled rows.
    Each converted row keeps its length and draws its text from itself, so the split
    (train vs held-out documents) is preserved. The fractions are >= 0 and sum to at most 1;
    adding multi-turn rows leaves the continuation and recall rows of the same seed unchanged.
    """
    fractions = (chat_fraction, recall_fraction, multi_turn_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        raise ValueError(
            f"chat_fraction ({chat_fraction}), recall_fraction ({recall_fraction}) and "
            f"multi_turn_fraction ({multi_turn_fraction}) must be >= 0 and sum to at most 1"
        )
    if not any(fractions):
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
    n_multi = int(round(n * multi_turn_fraction))
    for i in order[n_chat + n_recall : n_chat + n_recall + n_multi]:
        out[i] = torch.tensor(_multi_turn_recall(tokenizer, sequences[i].tolist(), seq_len, rng))
    return out
