"""Quantized GEMM kernels (`kernels.quant`) against their torch references.

On CPU the Triton code runs in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny
shapes; the CUDA tests repeat the comparison at Llama-like sizes and skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from kernels.quant import (
    FP8_DTYPE,
    dequant_w4_ref,
    pack_int4_rows,
    per_token_quant,
    per_token_quant_ref,
    scaled_mm,
    scaled_mm_ref,
    unpack_int4_rows,
    w4a16_gemm,
    w4a16_gemm_ref,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (32, 5), dtype=torch.int32)
    packed = pack_int4_rows(q)
    assert packed.shape == (4, 5) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4_rows(packed), q)
    # Row 8r+i sits in bits 4i..4i+3 of word r (GPTQ's documented order).
    one = torch.zeros(8, 1, dtype=torch.int32)
    one[3, 0] = 0xA
    assert pack_int4_rows(one).item() == 0xA << 12


@pytest.mark.parametrize("dtype", [torch.int8, FP8_DTYPE])
def test_per_token_quant_matches_ref(dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 40) * torch.tensor([0.1, 1, 10, 0, 3])[:, None]  # row 3 is all zeros
    q, s = per_token_quant(x, dtype)
    q_ref, s_ref = per_token_quant_ref(x, dtype)
    torch.testing.assert_close(s, s_ref)
    # Values agree up to one quantization step (the interpreter's fp8 cast rounds differently):
    # 1 for int8, one ulp (|v| / 8 with 3 mantissa bits) for e4m3.
    step = 1.0 if dtype == torch.int8 else q_ref.float().abs() / 8 + 2**-9
    assert ((q.float() - q_ref.float()).abs() <= step).all()
    assert (q[3].float() == 0).all()
    # Dequantized values approximate x.
    err = (q_ref.float() * s_ref - x).abs().max()
    assert err <= x.abs().max() * (0.01 if dtype == torch.int8 else 0.07)


@pytest.mark.parametrize("dtype", [torch.int8, FP8_DTYPE])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_matches_ref(dtype, bias):
    torch.manual_seed(1)
    m, k, n = 7, 48, 20
    a_q, sa = per_token_quant_ref(torch.randn(m, k), dtype)
    w_q, sw = per_token_quant_ref(torch.randn(n, k), dtype)  # per-channel weight scales
    b = torch.randn(n) if bias else None
    out = scaled_mm(a_q, w_q, sa, sw[:, 0].contiguous(), torch.float32, b)
    ref = scaled_mm_ref(a_q, w_q, sa, sw[:, 0], torch.float32, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _random_w4(k: int, n: int, group_size: int, act_order: bool, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    groups = k // group_size
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (groups, n), generator=gen).to(dtype)
    g_idx = None
    if act_order:  # a shuffled assignment of rows to groups, group_size rows each
        g_idx = (torch.randperm(k, generator=gen) // group_size).to(torch.int32)
    return pack_int4_rows(q), scales, zeros, g_idx, q


@pytest.mark.parametrize("act_order,group,split_k", [(False, 16, 1), (True, 16, 1),
                                                     (False, 32, 1), (True, 16, 2),
                                                     (False, 32, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_matches_ref(act_order, group, split_k, dtype):
    # group 32 = the interpreter's BLOCK_K: the kernel's one-group-per-tile path; split_k 4 over
    # K = 96 leaves the last split empty (rows beyond K masked)
    k, n, m = (96 if split_k == 4 else 64), 24, 5
    qweight, scales, zeros, g_idx, q = _random_w4(k, n, group, act_order, dtype)
    # The reference dequantization is the documented formula.
    g = g_idx.long() if act_order else torch.arange(k) // group
    w = (q.float() - zeros.float()[g]) * scales.float()[g]
    torch.testing.assert_close(dequant_w4_ref(qweight, scales, zeros, g_idx, group), w)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = w4a16_gemm(x, qweight, scales, zeros, g_idx, group, bias, split_k=split_k)
    ref = w4a16_gemm_ref(x, qweight, scales, zeros, g_idx, group, bias)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------ CUDA (Llama-like sizes)


@cuda
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.int8, FP8_DTYPE])
def test_scaled_mm_cuda(m, dtype):
    torch.manual_seed(0)
    k, n = 4096, 1024
    a_q, sa = per_token_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), dtype)
    a_ref, sa_ref = per_token_quant_ref(torch.randn(1, 1), dtype)  # smoke of the ref on cuda
    w_q, sw = per_token_quant_ref(torch.randn(n, k, device="cuda"), dtype)
    out = scaled_mm(a_q, w_q, sa, sw[:, 0].contiguous(), torch.bfloat16)
    ref = scaled_mm_ref(a_q, w_q, sa, sw[:, 0], torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert a_ref.dtype == dtype and sa_ref.shape == (1, 1)


@cuda
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_cuda(m, act_order):
    k, n, group = 4096, 1024, 128
    qweight, scales, zeros, g_idx, _ = _random_w4(k, n, group, act_order, torch.bfloat16)
    args = [t.cuda() if t is not None else None for t in (qweight, scales, zeros, g_idx)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = w4a16_gemm(x, *args, group)
    ref = w4a16_gemm_ref(x, *args, group)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=5e-2)
