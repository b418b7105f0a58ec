"""FP8 KV cache: the store quantizes with per-tensor scales, attention dequantizes.

The Triton attention kernels read an FP8 cache in the interpreter (fp32/fp16 queries) and must
match the reference reading the same bytes; the reference itself must stay close to attention
over the unquantized K/V. The Triton store is compared on CUDA only: the interpreter's fp32 -> fp8
cast is wrong for some values (see kernels/quant.py).

Dimension legend: T tokens, B sequences, Hq/Hkv heads, D head dim, N blocks, P block size.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import paged_attention, paged_attention_ref, store_kv, store_kv_ref

P, D = 16, 16
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _paged(seqs, num_heads, num_kv_heads, dtype, kv_dtype, k_scale, v_scale, device="cpu"):
    """Query, an FP8 cache filled through store_kv_ref, the unquantized cache, metadata."""
    gen = torch.Generator().manual_seed(0)
    need = [-(-s // P) for _, s in seqs]
    num_blocks = sum(need) + 2
    ids = list(range(1, num_blocks))
    random.Random(0).shuffle(ids)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    slots = []
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
        slots += [int(tables[b, p // P]) * P + p % P for p in range(seqs[b][1])]
    total = len(slots)
    key = torch.randn(total, num_kv_heads, D, generator=gen) * 3
    value = torch.randn(total, num_kv_heads, D, generator=gen) * 3
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    full = torch.zeros(2, num_blocks, P, num_kv_heads, D)
    store_kv_ref(key, value, full, slot_mapping)
    cache = torch.zeros(2, num_blocks, P, num_kv_heads, D, dtype=kv_dtype)
    store_kv_ref(key, value, cache, slot_mapping, k_scale, v_scale)
    query = torch.randn(sum(q for q, _ in seqs), num_heads, D, generator=gen).to(dtype)
    qsl = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32)
    meta = [t.to(device) for t in (qsl, seq_lens, tables)]
    return (query.to(device), cache.to(device), full.to(device), meta,
            (key.to(device), value.to(device), slot_mapping.to(device)))


@pytest.mark.parametrize("kv_dtype", FP8)
def test_store_ref_quantizes_with_scales(kv_dtype):
    _, cache, full, _, _ = _paged([(3, 20)], 2, 1, torch.float32, kv_dtype, 0.5, 2.0)
    # Dequantized cache = stored * scale approximates the real K/V (3 mantissa bits for e4m3,
    # 2 for e5m2) and the stored values are the real ones divided by the scale.
    rel = 2**-4 if kv_dtype == torch.float8_e4m3fn else 2**-3
    for i, scale in ((0, 0.5), (1, 2.0)):
        deq = cache[i].float() * scale
        assert ((deq - full[i]).abs() <= full[i].abs() * rel + 1e-2).all()
    # Saturation instead of inf/NaN for values beyond the format's range.
    big = torch.full((1, 1, D), 1e6)
    small_cache = torch.zeros(2, 1, P, 1, D, dtype=kv_dtype)
    store_kv_ref(big, -big, small_cache, torch.tensor([0]), 1.0, 1.0)
    fmax = torch.finfo(kv_dtype).max
    assert (small_cache[0, 0, 0].float() == fmax).all()
    assert (small_cache[1, 0, 0].float() == -fmax).all()


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_reads_fp8_cache(kv_dtype, dtype):
    seqs = [(5, 5), (1, 40), (7, 30)]  # prefill, decode, prefill on a cached prefix
    query, cache, full, meta, _ = _paged(seqs, 4, 2, dtype, kv_dtype, 0.5, 2.0)
    out = paged_attention(query, cache, *meta, D**-0.5, max(q for q, _ in seqs),
                          num_splits=2, k_scale=0.5, v_scale=2.0)
    ref = paged_attention_ref(query, cache, *meta, D**-0.5, 0.5, 2.0)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # Against the unquantized cache: close, not equal (FP8 rounding of K and V).
    exact = paged_attention_ref(query.float(), full, *meta, D**-0.5)
    err = ((ref.float() - exact).abs().max() / exact.abs().max()).item()
    assert err < (0.1 if kv_dtype == torch.float8_e4m3fn else 0.2), err
    assert err > 0


@cuda
@pytest.mark.parametrize("kv_dtype", FP8)
def test_store_kv_cuda_matches_ref(kv_dtype):
    _, cache, _, _, (key, value, slots) = _paged([(1, 50), (4, 33)], 4, 2, torch.float32,
                                                 kv_dtype, 0.5, 2.0, device="cuda")
    ours = torch.zeros_like(cache)
    store_kv(key.bfloat16(), value.bfloat16(), ours, slots, 0.5, 2.0)
    ref = torch.zeros_like(cache)
    store_kv_ref(key.bfloat16(), value.bfloat16(), ref, slots, 0.5, 2.0)
    rel = 2**-3 if kv_dtype == torch.float8_e4m3fn else 2**-2
    diff = (ours.float() - ref.float()).abs()
    assert (diff <= ref.float().abs() * rel + 1e-6).all()


@cuda
@pytest.mark.parametrize("kv_dtype", FP8)
def test_attention_cuda_fp8(kv_dtype):
    seqs = [(5, 5), (1, 300), (37, 129)] + [(1, 77)] * 5
    query, cache, _, meta, _ = _paged(seqs, 8, 2, torch.bfloat16, kv_dtype, 0.5, 2.0, "cuda")
    out = paged_attention(query, cache, *meta, D**-0.5, 37, k_scale=0.5, v_scale=2.0)
    ref = paged_attention_ref(query, cache, *meta, D**-0.5, 0.5, 2.0)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
