"""Shared fixtures: tiny random decoders of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random decoder (GQA 4 query / 2 KV heads, head dim 16) in eval mode."""
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        attn_implementation=attn,
        tie_word_embeddings=False,
    )
    if family in ("mistral", "qwen2", "qwen3"):
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    return model.eval()


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer (vocab 120, fits tiny_model's 128) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[UNK]", "</s>"], limit_alphabet=90, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer(texts: list[str]):
    """:func:`tiny_tokenizer` with a ChatML chat template (like SmolLM2's, without a system turn)."""
    tok = tiny_tokenizer([*texts, CHATML])
    tok.chat_template = CHATML
    return tok


def run_fresh_script(root, source: str, args: list[str], timeout: float, **env: str) -> dict:
    """Run ``source`` as ``root/check.py`` in a new Python process (offline); return its results.json."""
    import json
    import os
    import subprocess
    import sys

    script = root / "check.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script), str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **env},
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((root / "results.json").read_text())


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and least disturbed by other load, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def stdlib_texts() -> dict[str, str]:
    """Real English/Python text available wherever Python is: stdlib sources (each > 2000 characters)."""
    import glob
    import inspect
    import json
    import textwrap

    return {
        "textwrap.txt": inspect.getsource(textwrap),
        "glob.txt": inspect.getsource(glob),
        "json_decoder.txt": inspect.getsource(json.decoder),
    }


def write_tiny_workspace(root, extra_texts: dict[str, str] | None = None):
    """``root/text/*.txt`` (real text) and ``root/tiny_model`` (a 2-layer llama + a tokenizer trained on
    the text, saved like any HF model). Returns ``(model_dir, text_glob)``."""
    texts = {**stdlib_texts(), **(extra_texts or {})}
    (root / "text").mkdir(exist_ok=True)
    for name, text in texts.items():
        (root / "text" / name).write_text(text)
    tok = tiny_tokenizer(list(texts.values()))
    model = tiny_model("llama")
    assert len(tok) <= model.config.vocab_size
    model.save_pretrained(root / "tiny_model")
    tok.save_pretrained(root / "tiny_model")
    return root / "tiny_model", str(root / "text" / "*.txt")


def benchmark_script(name: str, monkeypatch, *also: str):
    """Import ``benchmarks/<name>.py`` afresh, its folder on ``sys.path`` for this test only.

    ``also``: other modules of that folder it imports, re-imported too.
    """
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    for mod in (name, *also):
        sys.modules.pop(mod, None)
    return importlib.import_module(name)
