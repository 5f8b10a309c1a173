"""Chat-formatted training rows (continuation, recall, multi-turn recall) mixed into real-text sequences."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_chat_tokenizer, tiny_tokenizer

from modelopt_dms.training.chat_data import MULTI_TURN_TEMPLATES, RECALL_TEMPLATES, mix_chat_sequences
from modelopt_dms.training.recipe import DataSection

FILLER = "The quick brown fox jumps over the lazy dog 0123456789, said Zed; pack my box with jugs. "
PHRASES = (
    "Continue this text: Read the text and "
    "answer the question after it. Question: What is the secret code? Which number were you asked "
    "to remember? Remember this number: The access token for the build server is. Note: the room "
    "number for the meeting is. The order id you need later is. What is the order id? "
    "My badge number is. Keep it in mind. Noted. Now read this: Done reading. Some text for you: "
    "That is all of it. I have read it. Wi-Fi password for today; I will need it later. Got it. "
    "Please note my flight number: I have noted your flight number. What is my flight number? "
    "Our project budget code is. Understood, I will keep it. Which budget code did I give you? "
)


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer([FILLER * 30, PHRASES * 30])


@pytest.fixture(scope="module")
def rows(tok):
    ids = tok(FILLER * 200, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i * 400 : (i + 1) * 400] for i in range(20)])


def test_fractions_lengths_and_determinism(tok, rows):
    out = mix_chat_sequences(tok, rows, 0.25, 0.5, seed=3)
    assert out.shape == rows.shape
    texts = [tok.decode(r) for r in out]
    chat = [t for t in texts if "Continue this text" in t]
    recall = [t for t in texts if "Read the text and answer" in t]
    assert len(chat) == 5 and len(recall) == 10
    assert sum(torch.equal(a, b) for a, b in zip(out, rows, strict=True)) == 5  # untouched rows
    assert torch.equal(out, mix_chat_sequences(tok, rows, 0.25, 0.5, seed=3))
    assert not torch.equal(out, mix_chat_sequences(tok, rows, 0.25, 0.5, seed=4))
    assert torch.equal(mix_chat_sequences(tok, rows, 0.0, 0.0), rows)


def test_recall_rows_ask_for_a_hidden_fact_and_answer_it(tok, rows):
    out = mix_chat_sequences(tok, rows, 0.0, 1.0, seed=0)
    for row in out:
        text = tok.decode(row)
        question = text.split("Question: ")[-1].split("<|im_end|>")[0]
        answer = text.split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
        assert re.fullmatch(r"\d{4,7}", answer), answer
        statement = next(s for s, q in RECALL_TEMPLATES if q == question)
        body = text.split("Question: ")[0].replace("\n", "")
        assert statement.format(v=answer) in body  # the asked fact is in the context
        assert "pass key" not in text  # never the evaluation's wording


def test_continuation_rows_are_the_same_document(tok, rows):
    out = mix_chat_sequences(tok, rows, 1.0, 0.0, seed=0)
    for src, row in zip(rows, out, strict=True):
        text = tok.decode(row)
        assert text.count("<|im_start|>") == 2 and text.rstrip().endswith("<|im_end|>")
        user = text.split("Continue this text:\n\n")[1].split("<|im_end|>")[0]
        assistant = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        assert (user + assistant) in tok.decode(src)  # the row's own text, in order


def test_bad_fractions_and_missing_template(tok, rows):
    with pytest.raises(ValueError, match="sum to at most 1"):
        mix_chat_sequences(tok, rows, 0.6, 0.6)
    with pytest.raises(ValueError, match="must be at most 1"):
        DataSection(chat_fraction=0.7, recall_fraction=0.4)
    with pytest.raises(ValueError, match="must be at most 1"):
        DataSection(chat_fraction=0.2, recall_fraction=0.4, multi_turn_fraction=0.5)
    with pytest.raises(ValueError, match="sum to at most 1"):
        mix_chat_sequences(tok, rows, 0.2, 0.4, multi_turn_fraction=0.5)
    with pytest.raises(ValueError, match="packing"):
        DataSection(multi_turn_fraction=0.2, packing=True)
    with pytest.raises(ValueError, match="too short"):
        mix_chat_sequences(tok, rows[:, :40], 0.0, 0.0, multi_turn_fraction=1.0)
    plain = tiny_tokenizer([FILLER])
    with pytest.raises(ValueError, match="no chat template"):
        mix_chat_sequences(plain, rows, 0.5, 0.0)
    with pytest.raises(ValueError, match="too short"):
        mix_chat_sequences(tok, rows[:, :20], 0.0, 1.0)


def test_multi_turn_rows_state_the_fact_in_an_earlier_turn_and_ask_for_it_last(tok, rows):
    out = mix_chat_sequences(tok, rows, 0.0, 0.0, seed=1, multi_turn_fraction=1.0)
    questions = set()
    for src, row in zip(rows, out, strict=True):
        text = tok.decode(row)
        turns = [t.split("<|im_end|>")[0] for t in text.split("<|im_start|>")[1:]]
        roles = [t.split("\n", 1)[0] for t in turns]
        assert roles == ["user", "assistant"] * 3, roles
        fact, ack, document, _, question, answer = (t.split("\n", 1)[1] for t in turns)
        assert re.fullmatch(r"\d{4,7}", answer), answer
        statement, expected_ack, expected_q = next(m for m in MULTI_TURN_TEMPLATES if m[2] == question)
        assert fact == statement.format(v=answer) and ack == expected_ack
        assert answer not in document  # the fact is only in the first turn
        filler = document.split(":\n\n", 1)[1].split("\n\nThat is all")[0]
        assert filler and filler in tok.decode(src)  # the row's own text
        assert "locker" not in text and "pass key" not in text  # never the evaluation's wording
        questions.add(question)
    assert len(questions) >= 3


def test_multi_turn_rows_leave_the_other_rows_of_the_seed_unchanged(tok, rows):
    before = mix_chat_sequences(tok, rows, 0.25, 0.25, seed=5)
    after = mix_chat_sequences(tok, rows, 0.25, 0.25, seed=5, multi_turn_fraction=0.25)
    changed = [i for i in range(rows.shape[0]) if not torch.equal(before[i], after[i])]
    assert len(changed) == 5 and all(torch.equal(before[i], rows[i]) for i in changed)
    assert all(
        "Now read this" in tok.decode(after[i]) or "Some text for you" in tok.decode(after[i])
        for i in changed
    )
