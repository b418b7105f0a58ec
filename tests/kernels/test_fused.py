"""Fused elementwise kernels (RMSNorm + residual, rotary, SiLU-and-mul) against their torch refs.

CPU tensors run in the Triton interpreter (fp32/fp16: the interpreter rounds bf16 wrongly), CUDA
tensors compiled (conftest turns the interpreter on unless the GPU run sets TRITON_INTERPRET=0).

Dimension legend: T tokens, N normalised size, Hq/Hkv query/kv heads, D head dim,
I intermediate size.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.norm import rms_norm, rms_norm_ref
from kernels.rotary import rotary_embedding, rotary_embedding_ref
from workers.layers import RMSNorm, RotaryEmbedding, SiluAndMul

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
CASES = ([("cpu", dt) for dt in (torch.float32, torch.float16)] if INTERPRET else []) + (
    [("cuda", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EPS = 1e-6

pytestmark = pytest.mark.skipif(not DEVICES, reason="needs the interpreter or a CUDA device")


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[want.dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ---------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 7])
@pytest.mark.parametrize("size", [40, 128])
def test_rms_norm(device: str, dtype: torch.dtype, num_tokens: int, size: int) -> None:
    x = randn(num_tokens, size, dtype=dtype, device=device, seed=0)
    weight = randn(size, dtype=dtype, device=device, seed=1)
    x_before = x.clone()
    assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 7])
def test_rms_norm_with_residual(device: str, dtype: torch.dtype, num_tokens: int) -> None:
    # x and residual are strided row slices, as views of wider buffers would be.
    x = randn(num_tokens, 2, 72, dtype=dtype, device=device, seed=2)[:, 0]
    residual = randn(num_tokens, 96, dtype=dtype, device=device, seed=3)[:, 10:82]
    weight = randn(72, dtype=dtype, device=device, seed=4)
    out, new_residual = rms_norm(x, weight, EPS, residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, EPS, residual)
    assert_close(out, ref_out)
    # The add rounds once to the activation dtype, like torch: bit-identical.
    assert torch.equal(new_residual, ref_residual)


@pytest.mark.parametrize("device,dtype", CASES)
def test_rms_norm_per_head_views(device: str, dtype: torch.dtype) -> None:
    # Qwen3's q/k norm over [T, heads, D] column slices of the packed qkv output.
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 4, 2, 16
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(num_tokens, width, dtype=dtype, device=device, seed=5)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    weight = randn(head_dim, dtype=dtype, device=device, seed=6)
    for view in (q, k):
        out = rms_norm(view, weight, EPS)
        assert out.is_contiguous()
        assert_close(out, rms_norm_ref(view, weight, EPS))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp32_weight_promotes(device: str) -> None:
    # A norm kept in fp32 next to half activations: the output is fp32, like torch's promotion.
    x = randn(3, 40, dtype=torch.float16, device=device, seed=7)
    weight = randn(40, dtype=torch.float32, device=device, seed=8)
    out = rms_norm(x, weight, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_strided_last_dim() -> None:
    x = torch.randn(16, 8).t()  # [8, 16] with element stride 8
    with pytest.raises(AssertionError):
        rms_norm(x, torch.ones(16), EPS)


# ---------------------------------------------------------------- rotary


def make_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """A packed qkv buffer [T, (Hq + 2 Hkv) * D] and its q [T, Hq, D] / k [T, Hkv, D] views."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=9)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k


def make_tables(max_pos: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp32 cos/sin tables [max_pos, D/2]: any wrong row or column changes the result."""
    return (randn(max_pos, head_dim // 2, dtype=torch.float32, device=device, seed=10),
            randn(max_pos, head_dim // 2, dtype=torch.float32, device=device, seed=11))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 6])
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 16), ((3, 1), 24), ((40, 8), 32)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary(device: str, dtype: torch.dtype, num_tokens: int, heads: tuple[int, int],
                head_dim: int, inplace: bool) -> None:
    # (3, 1) x 24: D/2 = 12 is not a power of two; (40, 8) spans several head tiles.
    num_heads, num_kv_heads = heads
    qkv, q, k = make_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    cos, sin = make_tables(50, head_dim, device)
    gen = torch.Generator().manual_seed(12)
    positions = torch.randint(0, 50, (num_tokens,), generator=gen).to(device)
    before = qkv.clone()
    ref_q, ref_k = rotary_embedding_ref(q, k, positions, cos, sin)
    out_q, out_k = rotary_embedding(q, k, positions, cos, sin, inplace=inplace)
    for got, want in ((out_q, ref_q), (out_k, ref_k)):
        if dtype == torch.float32 or device == "cuda":
            # On the GPU the compiler contracts a*b + c into one FMA (one rounding instead of
            # two), so half-precision results may differ from eager torch by one ulp.
            assert_close(got, want)
        else:  # the interpreter rounds every product and sum where eager torch rounds
            assert torch.equal(got, want)
    q_size = num_heads * head_dim
    kv_end = q_size + num_kv_heads * head_dim
    if inplace:
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
        assert torch.equal(qkv[:, kv_end:], before[:, kv_end:])  # v untouched
    else:
        assert torch.equal(qkv, before)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_int32_positions(device: str) -> None:
    _, q, k = make_qkv(4, 2, 2, 16, torch.float32, device)
    cos, sin = make_tables(8, 16, device)
    positions = torch.tensor([7, 0, 3, 3], dtype=torch.int32, device=device)
    ref_q, ref_k = rotary_embedding_ref(q, k, positions.long(), cos, sin)
    out_q, out_k = rotary_embedding(q, k, positions, cos, sin)
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)


# ---------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 5])
@pytest.mark.parametrize("size", [40, 1100])
def test_silu_and_mul(device: str, dtype: torch.dtype, num_tokens: int, size: int) -> None:
    # size 1100 spans two column blocks; x rows are strided (a slice of a wider buffer).
    x = randn(num_tokens, 2 * size + 6, dtype=dtype, device=device, seed=13)[:, 3:3 + 2 * size]
    x = x * 4  # reach silu's saturated tails
    out = silu_and_mul(x)
    assert out.is_contiguous()
    assert_close(out, silu_and_mul_ref(x))


# ---------------------------------------------------------------- layers dispatch


@pytest.mark.parametrize("device,dtype", CASES)
def test_layers_agree_with_kernels_and_refs(device: str, dtype: torch.dtype) -> None:
    """workers.layers on `device` (refs on CPU, kernels on CUDA) against both implementations."""
    num_tokens, hidden, head_dim = 5, 64, 16
    norm = RMSNorm(hidden, EPS).to(device=device, dtype=dtype)
    norm.weight.data.copy_(randn(hidden, dtype=dtype, device=device, seed=14))
    x = randn(num_tokens, hidden, dtype=dtype, device=device, seed=15)
    residual = randn(num_tokens, hidden, dtype=dtype, device=device, seed=16)
    out, new_residual = norm(x, residual)
    for impl in (rms_norm, rms_norm_ref):
        want_out, want_residual = impl(x, norm.weight, EPS, residual)
        assert_close(out, want_out)
        assert torch.equal(new_residual, want_residual)

    gate_up = randn(num_tokens, 2 * hidden, dtype=dtype, device=device, seed=17)
    for impl in (silu_and_mul, silu_and_mul_ref):
        assert_close(SiluAndMul()(gate_up), impl(gate_up))

    rope = RotaryEmbedding(head_dim, 32, {"rope_type": "default", "rope_theta": 10000.0})
    rope = rope.to(device)
    _, q, k = make_qkv(num_tokens, 4, 2, head_dim, dtype, device)
    positions = torch.tensor([0, 31, 4, 4, 9], device=device)
    wants = [impl(q.clone(), k.clone(), positions, rope.cos_cache, rope.sin_cache)
             for impl in (rotary_embedding, rotary_embedding_ref)]
    got_q, got_k = rope(positions, q, k)
    for want_q, want_k in wants:
        assert_close(got_q, want_q)
        assert_close(got_k, want_k)


# ---------------------------------------------------------------- CUDA graphs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_sees_new_inputs() -> None:
    """Capture all three kernels once; replays on fresh inputs match the refs (no host syncs)."""
    dtype, device = torch.bfloat16, "cuda"
    x = randn(3, 64, dtype=dtype, device=device, seed=18)
    residual = randn(3, 64, dtype=dtype, device=device, seed=19)
    weight = randn(64, dtype=dtype, device=device, seed=20)
    qkv, q, k = make_qkv(3, 4, 2, 16, dtype, device)
    cos, sin = make_tables(16, 16, device)
    positions = torch.tensor([1, 2, 3], device=device)
    gate_up = randn(3, 128, dtype=dtype, device=device, seed=21)

    def step() -> tuple[torch.Tensor, ...]:
        out, new_residual = rms_norm(x, weight, EPS, residual)
        rotary_embedding(q, k, positions, cos, sin, inplace=True)
        return out, new_residual, silu_and_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (22, 23):
        for buf in (x, residual, qkv, gate_up):
            buf.copy_(randn(*buf.shape, dtype=dtype, device=device, seed=seed))
            seed += 10
        positions.copy_(torch.randint(0, 16, (3,), device=device))
        q0, k0 = q.clone(), k.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_residual = rms_norm_ref(x, weight, EPS, residual)
        ref_q, ref_k = rotary_embedding_ref(q0, k0, positions, cos, sin)
        assert_close(outs[0], ref_out)
        assert torch.equal(outs[1], ref_residual)
        assert_close(q, ref_q)  # one FMA rounding may differ from eager torch (see test_rotary)
        assert_close(k, ref_k)
        assert_close(outs[2], silu_and_mul_ref(gate_up))
