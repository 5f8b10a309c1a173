"""Checks that need a CUDA GPU (skipped without one; run by ``scripts/gpu_check.sh``).

The batched cache in bf16 and fp32 on the GPU against the fp64 masked reference on CPU, decode
steps that add no host syncs to what transformers itself does, FP8 storage, decode steps replayed
from CUDA graphs (``GraphDecoder``) against eager steps, and the trainer on
CUDA (flex-attention kernel with its backward, fused lm_head + KL, bf16 base, LoRA deltas) against
the eager CPU path.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import tiny_model
from test_cache_generation import full_logits, incremental_logits, padded_batch, pieces
from transformers import DynamicCache

import modelopt_dms as dms
from modelopt_dms import DMSCache, cache_stats

# DMS_TEST_DEVICE=cpu dry-runs the checks that do not need CUDA itself (to test the tests).
CUDA = torch.device(os.environ.get("DMS_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        CUDA.type == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (scripts/gpu_check.sh)",
    ),
]
needs_cuda = pytest.mark.skipif(CUDA.type != "cuda", reason="CUDA-only (sync debug mode, flex backward)")


def dms_model(window=3, std=0.05, seed=0, attn="sdpa", **cfg):
    model = dms.apply_dms(tiny_model("llama", attn=attn, seed=seed, **cfg), {"window_size": window})
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.normal_(0, std, generator=gen)
    return model


def err_on_real(got, want, mask) -> float:
    real = mask.bool().cpu()
    return (got.cpu()[real].double() - want.cpu()[real].double()).abs().max().item()


# ------------------------------------------------------------------------------------------ the cache
@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_fp32_cuda_cache_equals_the_fp64_cpu_masked_reference(layout):
    model = dms_model(num_key_value_heads=2, num_attention_heads=8)
    ids, mask = padded_batch([40, 31, 22, 40], 40, seed=1)
    want = full_logits(model.double(), ids, mask)
    model = model.float().to(CUDA)
    cache = DMSCache(layout=layout, block_size=8, page_size=8, prefill_chunk_size=7)
    got = incremental_logits(model, ids.to(CUDA), mask.to(CUDA), pieces(18, 9, 13), cache)
    assert got.device.type == CUDA.type
    assert err_on_real(got, want, mask) <= 1e-4
    assert cache_stats(cache)["compression_ratio"] > 1.2  # really evicting


@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_bf16_cuda_cache_is_as_close_to_the_reference_as_bf16_dense_attention(layout):
    """bf16 rounding is the only difference: DMS's error is of the size of the dense bf16 path's."""
    model = dms_model()
    ids, mask = padded_batch([36, 25], 36, seed=2)
    want = full_logits(model.double(), ids, mask)
    model = model.to(CUDA, torch.bfloat16)
    ids, mask_d = ids.to(CUDA), mask.to(CUDA)
    dense = full_logits(model, ids, mask_d)  # bf16 masked reference on the GPU
    got = incremental_logits(model, ids, mask_d, pieces(20, 6, 10), DMSCache(layout=layout))
    base = err_on_real(dense, want, mask)
    assert err_on_real(got, want, mask) <= 2 * base + 0.02, (err_on_real(got, want, mask), base)


def _count_syncs(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@needs_cuda
@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_decode_steps_add_no_host_syncs_to_what_transformers_does(layout):
    model = dms_model(num_key_value_heads=4, num_attention_heads=8).to(CUDA)
    base = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8).to(CUDA)
    ids = torch.randint(3, 128, (16, 40), device=CUDA)

    def decode(m, cache, steps=6):
        with torch.no_grad():
            tok = m(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            m(tok, past_key_values=cache, use_cache=True)
            return lambda: [m(tok, past_key_values=cache, use_cache=True) for _ in range(steps)]

    dense_steps = decode(base, DynamicCache())
    dms_steps = decode(model, DMSCache(layout=layout, block_size=256, page_size=64))
    dense, ours = _count_syncs(dense_steps), _count_syncs(dms_steps)
    assert ours <= dense, f"DMS decode: {ours} host syncs in 6 steps, dense DynamicCache {dense}"


def test_fp8_storage_on_cuda_matches_the_masked_reference():
    model = dms_model(window=3).to(CUDA)
    ids, mask = padded_batch([30, 21], 30, seed=4)
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    calib = [torch.randint(3, 128, (2, 24), device=CUDA) for _ in range(2)]
    model = dms.quantize_fp8(model, calib, weights=False, kv_cache=True)
    want = full_logits(model, ids, mask)  # the masked path fake-quantises k/v the same way
    cache = DMSCache()
    got = incremental_logits(model, ids, mask, pieces(16, 5, 9), cache)
    assert {layer.kv.k.dtype for layer in cache.dms_layers().values()} == {torch.float8_e4m3fn}
    assert err_on_real(got, want, mask) <= 1e-3


def test_generate_on_cuda_equals_the_dynamic_cache():
    model = dms_model().to(CUDA)
    ids, mask = padded_batch([14, 9], 14, seed=6)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=mask.to(CUDA))
    with torch.no_grad():
        ref = model.generate(ids.to(CUDA), past_key_values=DynamicCache(), **kw)
        out = model.generate(ids.to(CUDA), return_dict_in_generate=True, **kw)
    assert isinstance(out.past_key_values, DMSCache)
    assert torch.equal(out.sequences, ref)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager_decoding(dtype):
    """GraphDecoder replays real CUDA graphs: same logits and cache as eager steps, across recaptures."""
    model = dms_model(num_key_value_heads=2, num_attention_heads=8, std=0.5).to(CUDA, dtype).eval()
    ids, mask = padded_batch([40, 31, 22], 40, seed=3)
    ids, mask = ids.to(CUDA), mask.to(CUDA)

    def prefill():
        cache = DMSCache(block_size=8)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        return cache, out.logits[:, -1:].argmax(-1)

    cache_ref, tok = prefill()
    ref, fed, pos = [], [tok], mask.sum(-1, keepdim=True)
    with torch.inference_mode():
        for _ in range(40):
            out = model(input_ids=fed[-1], position_ids=pos, past_key_values=cache_ref).logits
            ref.append(out.float().cpu())
            fed.append(out.argmax(-1))
            pos = pos + 1
    cache, _ = prefill()
    decoder = dms.GraphDecoder(model, cache, reserve=12)
    assert decoder.enabled
    got = [decoder.step(t).float().cpu() for t in fed[:-1]]  # the same tokens (bf16 ties may differ)
    assert decoder.captures >= 3
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=f"step {step}")
    for la, lb in zip(cache_ref.dms_layers().values(), cache.dms_layers().values(), strict=True):
        assert torch.equal(la.book.length, lb.book.length) and torch.equal(la.book.seen, lb.book.seen)


# ------------------------------------------------------------------------------------------ the trainer
def _rows(n=8, t=48, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _train(model, seqs, tmp, **kw):
    from modelopt_dms.training import TrainConfig, train

    base = dict(steps=3, lr=1e-3, batch_size=2, checkpoint_every=0, anneal_steps=2)
    return train(model, seqs, TrainConfig(**{**base, **kw}), str(tmp), progress=False)


@needs_cuda
def test_cuda_flex_fused_training_follows_the_cpu_eager_unfused_losses(tmp_path):
    def model():
        m = dms.apply_dms(tiny_model("llama"), {"window_size": 3, "target_compression_ratio": 2.0})
        return m

    seqs = _rows()
    cpu = _train(model(), seqs, tmp_path / "cpu", attention="eager", fused_kl=False)
    gpu_model = model().to(CUDA)
    gpu = _train(gpu_model, seqs, tmp_path / "gpu", attention="flex", fused_kl=True)
    assert all(p.device.type == CUDA.type for p in gpu_model.parameters())
    for a, b in zip(cpu, gpu, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * max(1.0, abs(a["loss"])), (a, b)


@needs_cuda
def test_flex_kernel_gradients_equal_the_eager_kernel_on_cuda():
    model = dms_model(window=2).to(CUDA)
    ids = _rows(n=2, t=64).to(CUDA)
    mask = torch.ones(2, 64, dtype=torch.long, device=CUDA)
    mask[0, :9] = 0
    model.train()
    dms.set_step(model, 5)
    params = [p for n, p in model.named_parameters() if "dms_adapter" in n]

    def grads(kernel):
        for m in dms.dms_modules(model):
            m.dms_switches.training_kernel = kernel
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        logits[1].float().pow(2).mean().add(logits[0, 9:].float().pow(2).mean()).backward()
        return logits.detach(), [p.grad.clone() for p in params]

    eager, g_eager = grads("eager")
    flex, g_flex = grads("flex")
    assert (eager[1] - flex[1]).abs().max() <= 1e-4 and (eager[0, 9:] - flex[0, 9:]).abs().max() <= 1e-4
    for a, b in zip(g_eager, g_flex, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_bf16_training_on_cuda_keeps_fp32_adapters_and_moves_them(tmp_path):
    model = dms.apply_dms(tiny_model("llama"), {"window_size": 3, "target_compression_ratio": 2.0})
    model = model.to(CUDA, torch.bfloat16)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if "dms_adapter" in n}
    hist = _train(model, _rows(), tmp_path / "run", autocast_bf16=True, lr=1e-4)
    assert all(r["loss"] == r["loss"] for r in hist)
    after = {n: p for n, p in model.named_parameters() if "dms_adapter" in n}
    assert all(p.dtype == torch.float32 and p.device.type == CUDA.type for p in after.values())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_lora_training_on_cuda_in_bf16_and_the_artifact_loads_merged(tmp_path):
    from modelopt_dms.nn.lora import lora_deltas, lora_disabled, merge_lora

    model = dms.apply_dms(tiny_model("llama"), {"window_size": 3, "target_compression_ratio": 2.0})
    original = dms.apply_dms(tiny_model("llama"), {"window_size": 3, "target_compression_ratio": 2.0})
    model = model.to(CUDA, torch.bfloat16)
    _train(model, _rows(), tmp_path / "run", autocast_bf16=True, lora_rank=2, lora_lr=1e-2)
    deltas = lora_deltas(model)
    assert deltas and all(
        d.lora_a.dtype == torch.float32 and d.lora_b.device.type == CUDA.type for d in deltas.values()
    )
    assert all(d.lora_b.abs().max() > 0 for d in deltas.values())
    ids = _rows(n=1, t=32).to(CUDA)
    original = original.to(CUDA, torch.bfloat16)
    with torch.no_grad(), dms.eviction_disabled(model), lora_disabled(model), dms.eviction_disabled(original):
        want = original(input_ids=ids).logits  # the teacher: the original model exactly
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    dms.save_adapters(model, tmp_path / "heads")
    with torch.no_grad(), dms.eviction_disabled(model):
        adapted = model(input_ids=ids).logits.float()
    merge_lora(model)
    fresh = dms.load_adapters(tiny_model("llama").to(CUDA, torch.bfloat16), tmp_path / "heads")
    with torch.no_grad(), dms.eviction_disabled(fresh):
        loaded = fresh(input_ids=ids).logits.float()
    assert (loaded - adapted).abs().max() <= 0.05 * adapted.abs().max()  # bf16 merge rounding
