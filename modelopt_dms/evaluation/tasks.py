"""Evaluation samples: real-text fidelity windows and generated long-context QA tasks.

Every sample is a list of ``segments`` fed to the model in order (one forward call each) and
either a ``scored`` continuation (fidelity) or the expected ``answers`` (QA). The first segment
is the long context: it is what a prefill-time press (kvpress) compresses; later segments (the
question, later turns) are appended, as in kvpress's own pipeline. DMS sees the same segments
through one :class:`~modelopt_dms.DMSCache`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

__all__ = [
    "EvalSample",
    "make_fidelity_sample",
    "make_multi_turn_sample",
    "make_needle_sample",
]

_FILL = "\x00FILL\x00"
_DOORS = ("red", "blue", "green", "yellow", "white")


@dataclass
class EvalSample:
    """One evaluation prompt split into segments; see the module docstring."""

    task: str
    key: str
    segments: list[torch.Tensor]
    context_tokens: int
    answers: list[str] = field(default_factory=list)
    scored: torch.Tensor | None = None
    depths: list[float] = field(default_factory=list)
    max_new_tokens: int = 16
    prefix_segments: int = 1  # leading segments a prefill press compresses (together)

    @property
    def input_tokens(self) -> int:
        """Tokens fed before scoring / generation starts (all segments)."""
        return sum(int(s.shape[1]) for s in self.segments)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _row(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long)


def _filler(stream: list[int], n: int, rng: random.Random) -> list[int]:
    if len(stream) < n + 1:
        raise ValueError(f"need {n} filler tokens, the text stream has {len(stream)}")
    start = rng.randint(0, len(stream) - n - 1)
    return stream[start : start + n]


def _insert(filler: list[int], needles: list[list[int]], depths: list[float]) -> list[int]:
    """Insert each needle (token ids) at its relative depth of the filler (depths sorted)."""
    out, prev = [], 0
    for depth, needle in sorted(zip(depths, needles, strict=True), key=lambda x: x[0]):
        cut = int(len(filler) * depth)
        out += filler[prev:cut] + needle
        prev = cut
    return out + filler[prev:]


def make_fidelity_sample(window: torch.Tensor, context_tokens: int, key: str) -> EvalSample:
    """Real text: the first ``context_tokens`` ids are the context, the rest is scored.

    ``window`` is one ``(T,)`` row of held-out text (one document), ``T > context_tokens + 1``.
    """
    window = window.reshape(-1)
    if window.numel() < context_tokens + 2:
        raise ValueError(f"window of {window.numel()} tokens is too short for context {context_tokens}")
    return EvalSample(
        task="fidelity",
        key=key,
        segments=[window[:context_tokens].unsqueeze(0)],
        context_tokens=context_tokens,
        scored=window[context_tokens:].unsqueeze(0),
    )


def make_needle_sample(
    tokenizer, stream: list[int], context_tokens: int, n_needles: int, seed: int, depth: float | None = None
) -> EvalSample:
    """Needle-in-a-haystack over real filler text, chat formatted, about ``context_tokens`` long.

    One needle: a 5-digit pass key at ``depth`` (or a random depth), asked for at the end.
    Several needles: door codes ("The code for the red door is 12345.") at random depths; one
    door is asked for (the others are distractors) and the reply starts with "The code for the
    <door> door is".
    """
    if not 1 <= n_needles <= len(_DOORS):
        raise ValueError(f"n_needles must be in 1..{len(_DOORS)}, got {n_needles}")
    rng = random.Random(seed)
    values = [str(rng.randint(10000, 99999)) for _ in range(n_needles)]
    if n_needles == 1:
        depths = [depth if depth is not None else rng.uniform(0.05, 0.95)]
        statements = [f"\nThe pass key is {values[0]}. Remember it. {values[0]} is the pass key.\n"]
        intro = "There is a pass key hidden in the following text. Find it and remember it."
        question = "What is the pass key? Answer with the 5-digit number only."
        prefix = ""
        task, max_new = "needle", 12
    else:
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(n_needles))
        doors = _DOORS[:n_needles]
        statements = [f"\nThe code for the {d} door is {v}.\n" for d, v in zip(doors, values, strict=True)]
        intro = "Door codes are hidden in the following text. Find them and remember them."
        asked = rng.randrange(n_needles)
        question = f"What is the code for the {doors[asked]} door?"
        prefix = f"The code for the {doors[asked]} door is"
        values = [values[asked]]  # the other needles are distractors
        task, max_new = "multi_needle", 10
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{intro}\n\n{_FILL}\n\n{question}"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    before, after = text.split(_FILL)
    head, tail = _ids(tokenizer, before), _ids(tokenizer, after + prefix)
    needles = [_ids(tokenizer, s) for s in statements]
    n_fill = context_tokens - len(head) - len(tail) - sum(len(n) for n in needles)
    if n_fill < 16:
        raise ValueError(f"context_tokens {context_tokens} is too short for this task")
    body = _insert(_filler(stream, n_fill, rng), needles, depths)
    depth_key = f"d{depths[0]:.2f}" if n_needles == 1 else f"s{seed}"
    return EvalSample(
        task=task,
        key=f"{task}/{context_tokens}/{depth_key}/{seed}",
        segments=[_row(head + body), _row(tail)],
        context_tokens=context_tokens,
        answers=values,
        depths=depths,
        max_new_tokens=max_new,
    )


def make_multi_turn_sample(tokenizer, stream: list[int], context_tokens: int, seed: int) -> EvalSample:
    """Three user turns: a fact (turn 1), a long document (turn 2), a question about the fact.

    About ``context_tokens`` in all. Assistant replies of turns 1-2 are fixed text;
    the turn-3 reply starts with "Your locker code is" (an answer prefix, as in needle tests).

    Segments, one per turn: turn 1 with its reply, turn 2 with its reply, turn 3 up to the
    generation prompt. DMS feeds them one by one through its cache; a prefill press compresses
    turns 1-2 together (``prefix_segments=2``), as it would a conversation history.
    """
    rng = random.Random(seed)
    code = str(rng.randint(1000, 9999))
    msgs = [
        {"role": "user", "content": f"My locker code is {code}. Please remember it."},
        {"role": "assistant", "content": "Okay, I will remember it."},
        {"role": "user", "content": f"Here is a document:\n\n{_FILL}\n\nDid you read it?"},
        {"role": "assistant", "content": "Yes, I have read the document."},
        {"role": "user", "content": "What is my locker code?"},
    ]

    def render(n: int, gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen)

    t1, t2, t3 = render(2), render(4), render(5, gen=True)
    if not (t2.startswith(t1) and t3.startswith(t2)):
        raise ValueError("the tokenizer's chat template does not render conversations prefix-stably")
    before, after = t2[len(t1) :].split(_FILL)
    seg1, head2, tail2 = _ids(tokenizer, t1), _ids(tokenizer, before), _ids(tokenizer, after)
    seg3 = _ids(tokenizer, t3[len(t2) :] + "Your locker code is")
    n_fill = context_tokens - len(seg1) - len(head2) - len(tail2) - len(seg3)
    if n_fill < 16:
        raise ValueError(f"context_tokens {context_tokens} is too short for this task")
    return EvalSample(
        task="multi_turn",
        key=f"multi_turn/{context_tokens}/{seed}",
        segments=[_row(seg1), _row(head2 + _filler(stream, n_fill, rng) + tail2), _row(seg3)],
        context_tokens=context_tokens,
        answers=[code],
        depths=[0.0],
        max_new_tokens=12,
        prefix_segments=2,
    )
