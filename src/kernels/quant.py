"""Quantized GEMM kernels: per-token activation quantization, W8A8 scaled matmul, W4A16 GEMM.

Each operation has a Triton kernel (private `_name_kernel`), a public launcher that checks dtypes
and shapes, and a plain-torch `*_ref` that defines "correct" (fp32 math, no tiling).

Dimension legend:
    M  tokens (activation rows), K  input features, N  output features
    G  quantization groups along K (K // group_size)

K is a compile-time constant of every kernel (one specialization per layer shape; the interpreter
also needs a Python int as a loop bound). Scales are fp32 and multiply: real = quantized * scale.
    W8A8 (fp8 e4m3 or int8):  a_q [M, K], scale_a [M, 1] per token (dynamic);
                              w_q [N, K] (the nn.Linear layout), scale_w [N] per output channel
                              (a per-tensor scale is broadcast to [N] by the caller);
                              y = (a_q @ w_q^T) * scale_a * scale_w^T (+ bias).
    W4A16:  the canonical packed layout both GPTQ and AWQ checkpoints are converted to at load:

        qweight [K/8, N] int32   word (r, n) holds rows 8r .. 8r+7 of column n, row 8r+i in
                                 bits 4i .. 4i+3 (GPTQ's order; unsigned nibbles 0..15)
        scales  [G, N]  activation dtype
        zeros   [G, N]  activation dtype (unpacked integer zero points, 0..15)
        g_idx   [K] int32 or None: group of each input row (GPTQ act-order); None: k // group_size

        w[k, n] = (nibble(k, n) - zeros[g(k), n]) * scales[g(k), n];  y = x @ w (+ bias)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
INT8_MAX = 127.0
# A token of all zeros gets this scale instead of 0 (no division by zero, quantizes to 0).
_MIN_SCALE = 1e-12


class GemmTile(NamedTuple):
    """Launch constants of one GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Small M (decode) is bandwidth bound: narrow M tiles; large M (prefill) wants square tiles.
W8A8_TILES = {"small": GemmTile(16, 64, 128, 4, 4), "large": GemmTile(128, 128, 64, 8, 3)}
# W4A16 small-M tiles are narrow in N so that an 8B layer (N = 4096) still fills ~128 SMs.
W4A16_TILES = {"small": GemmTile(16, 32, 128, 4, 3), "large": GemmTile(64, 128, 64, 4, 3)}
_INTERPRET_TILE = GemmTile(16, 16, 32, 1, 1)
_SMALL_M = 64  # rows up to which the "small" tile is used


def _qmax(dtype: torch.dtype) -> float:
    if dtype == torch.int8:
        return INT8_MAX
    assert dtype in (torch.float8_e4m3fn, torch.float8_e5m2), dtype
    return torch.finfo(dtype).max


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def quantize_ref(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale, rounded (int8: to nearest; fp8: by the cast) and clamped to dtype's range."""
    qmax = _qmax(dtype)
    y = (x.float() / scale).clamp(-qmax, qmax)
    return (y.round() if dtype == torch.int8 else y).to(dtype)


def per_token_quant_ref(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K] dtype, scale [M, 1] fp32) with scale = max|row| / dtype max."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = (amax / _qmax(dtype)).clamp(min=_MIN_SCALE)
    return quantize_ref(x, scale, dtype), scale


def scaled_mm_ref(a_q: torch.Tensor, w_q: torch.Tensor, scale_a: torch.Tensor,
                  scale_w: torch.Tensor, out_dtype: torch.dtype,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """(a_q [M, K] @ w_q [N, K]^T) * scale_a [M, 1] * scale_w [N] (+ bias [N]) -> [M, N]."""
    y = (a_q.float() @ w_q.float().t()) * scale_a.float() * scale_w.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [K/8, N] int32 -> nibbles [K, N] int32 (row 8r+i = bits 4i.. of word row r)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)  # [8]
    nibbles = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    return nibbles.reshape(-1, qweight.shape[1])


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """nibbles [K, N] (0..15) -> qweight [K/8, N] int32; the inverse of `unpack_int4_rows`."""
    k, n = q.shape
    assert k % 8 == 0, f"K={k} must be a multiple of 8"
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q << shifts[None, :, None]).sum(dim=1)  # < 2**32, fits int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """Group of each of the K input rows: g_idx when given (act-order), else k // group_size."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(k, device=device) // group_size


def dequant_w4_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The canonical W4 layout (module docstring) -> w [K, N] fp32."""
    q = unpack_int4_rows(qweight).float()
    g = group_index(q.shape[0], group_size, g_idx, q.device)
    return (q - zeros.float()[g]) * scales.float()[g]


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, g_idx: torch.Tensor | None, group_size: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized w [K, N] (+ bias) -> [M, N] in x's dtype."""
    y = x.float() @ dequant_w4_ref(qweight, scales, zeros, g_idx, group_size)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, K: tl.constexpr, stride_x, stride_q, qmax,
                            min_scale, IS_INT: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: pass 1 finds max|x|, pass 2 writes x / scale.
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / qmax, min_scale)
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x / scale, -qmax), qmax)
        if IS_INT:
            # Round half away from zero (torch.round is half-to-even; ties are measure-zero).
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(q_ptr + row * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=cols < K)


@triton.jit
def _scaled_mm_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K: tl.constexpr,
                      stride_am, stride_wn, stride_om, HAS_BIAS: tl.constexpr,
                      IS_INT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out tile [BLOCK_M, BLOCK_N] = sum_k a[m, k] w[n, k], then * sa[m] * sw[n] once at the end.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32 if IS_INT else tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + ks) < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + (k + ks)[None, :],
                    mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + (k + ks)[:, None],
                    mask=(cols[None, :] < N) & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:  # the interpreter has no fp8/int8 dot: exact in fp32 for these sizes
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32),
                          input_precision="ieee").to(acc.dtype)
        elif IS_INT:
            acc += tl.dot(a, w, out_dtype=tl.int32)
        else:
            acc += tl.dot(a, w)
    sa = tl.load(sa_ptr + rows, mask=rows < M, other=0.0)
    sw = tl.load(sw_ptr + cols, mask=cols < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr, M, N, K: tl.constexpr,
                  stride_xm, stride_om, GROUP_SIZE: tl.constexpr, HAS_GIDX: tl.constexpr,
                  ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  K_SPLIT: tl.constexpr):
    # Dequantize a [BLOCK_K, BLOCK_N] weight tile in registers, then one tl.dot with x's tile.
    # Each packed word is loaded by the 8 rows it holds (served from L1) and shifted apart.
    # Split-K (grid axis 2): program z covers K rows [z*K_SPLIT, (z+1)*K_SPLIT) and writes an
    # fp32 partial at out_ptr + z*M*N (the launcher sums the partials in a fixed order).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_start = tl.program_id(2) * K_SPLIT
    out_ptr += tl.program_id(2).to(tl.int64) * M * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    shifts = ((ks % 8) * 4)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, K_SPLIT, BLOCK_K):  # constexpr bounds: also fine in the interpreter
        k = k_start + kk
        k_ok = (k + ks) < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k + ks)[None, :],
                    mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        tile_ok = k_ok[:, None] & col_ok[None, :]
        words = tl.load(qw_ptr + ((k + ks) // 8)[:, None].to(tl.int64) * N + cols[None, :],
                        mask=tile_ok, other=0)
        q = ((words >> shifts) & 0xF).to(tl.float32)
        if ONE_GROUP:  # the whole K tile lies in one group: one row of scales and zeros
            g_off = ((k // GROUP_SIZE) * N + cols)[None, :].to(tl.int64)
            row_ok = col_ok[None, :] & (k < K)  # an empty last split reads nothing
            s = tl.load(s_ptr + g_off, mask=row_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=row_ok, other=0.0).to(tl.float32)
        else:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + k + ks, mask=k_ok, other=0)
            else:
                g = (k + ks) // GROUP_SIZE
            g_off = g[:, None].to(tl.int64) * N + cols[None, :]
            s = tl.load(s_ptr + g_off, mask=tile_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=tile_ok, other=0.0).to(tl.float32)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), (q - z) * s, input_precision="ieee")
        else:
            acc += tl.dot(x, ((q - z) * s).to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _tile(table: dict[str, GemmTile], m: int, device: torch.device) -> GemmTile:
    if device.type == "cpu":  # TRITON_INTERPRET=1: smallest legal tile, fastest to interpret
        return _INTERPRET_TILE
    return table["small" if m <= _SMALL_M else "large"]


def per_token_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `per_token_quant_ref`: x [M, K] -> (x_q [M, K] dtype, scale [M, 1] fp32)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with contiguous rows"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    m, k = x.shape
    # The interpreter's fp32 -> fp8 cast is wrong for some values (126.8 -> 64): on CPU the
    # kernel writes the clamped fp32 values and torch does the cast.
    cast_later = x.device.type == "cpu" and dtype != torch.int8
    x_q = torch.empty((m, k), dtype=torch.float32 if cast_later else dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m > 0:
        block = min(triton.next_power_of_2(k), 1024 if x.is_cuda else 64)
        _per_token_quant_kernel[(m,)](x, x_q, scale, k, x.stride(0), x_q.stride(0), _qmax(dtype),
                                      _MIN_SCALE, IS_INT=dtype == torch.int8, BLOCK=block,
                                      num_warps=4 if block >= 512 else 1)
    return (x_q.to(dtype) if cast_later else x_q), scale


def scaled_mm(a_q: torch.Tensor, w_q: torch.Tensor, scale_a: torch.Tensor,
              scale_w: torch.Tensor, out_dtype: torch.dtype,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `scaled_mm_ref` for int8 or fp8 a_q [M, K] and w_q [N, K] -> [M, N] out_dtype."""
    (m, k), n = a_q.shape, w_q.shape[0]
    assert w_q.shape == (n, k), f"weight {tuple(w_q.shape)} does not match K={k}"
    assert a_q.dtype == w_q.dtype and a_q.dtype in (torch.int8, FP8_DTYPE), a_q.dtype
    assert a_q.stride(1) == 1 and w_q.stride(1) == 1
    assert scale_a.shape == (m, 1) and scale_a.dtype == torch.float32 and scale_a.is_contiguous()
    assert scale_w.shape == (n,) and scale_w.dtype == torch.float32 and scale_w.is_contiguous()
    assert bias is None or bias.shape == (n,)
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    tile = _tile(W8A8_TILES, m, a_q.device)
    grid = (triton.cdiv(m, tile.block_m), triton.cdiv(n, tile.block_n))
    _scaled_mm_kernel[grid](
        a_q, w_q, scale_a, scale_w, bias if bias is not None else scale_w, out, m, n, k,
        a_q.stride(0), w_q.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        IS_INT=a_q.dtype == torch.int8, UPCAST=a_q.device.type == "cpu",
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, g_idx: torch.Tensor | None, group_size: int,
               bias: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """Triton `w4a16_gemm_ref`: x [M, K] fp16/bf16/fp32 times the canonical W4 layout.

    split_k (a power of two; default: `_split_k`) splits K over programs for small M.
    """
    m, k = x.shape
    n = qweight.shape[1]
    assert x.stride(1) == 1 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert qweight.dtype == torch.int32 and qweight.shape == (k // 8, n) and k % 8 == 0
    assert qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    assert scales.shape == zeros.shape and scales.shape[1] == n, (scales.shape, zeros.shape)
    assert g_idx is None or (g_idx.shape == (k,) and g_idx.dtype == torch.int32)
    assert bias is None or bias.shape == (n,)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tile = _tile(W4A16_TILES, m, x.device)
    grid = (triton.cdiv(m, tile.block_m), triton.cdiv(n, tile.block_n))
    split = split_k or _split_k(grid[0] * grid[1], k, tile.block_k, x.device)
    # K rows per split: a multiple of BLOCK_K (so one-group tiles stay aligned to groups).
    k_split = triton.cdiv(triton.cdiv(k, split), tile.block_k) * tile.block_k
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                                device=x.device)
    _w4a16_kernel[(*grid, split)](
        x, qweight, scales, zeros, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, target, m, n, k, x.stride(0), n,
        GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None,
        ONE_GROUP=g_idx is None and group_size % tile.block_k == 0,
        HAS_BIAS=bias is not None and split == 1,
        UPCAST=x.device.type == "cpu" or x.dtype == torch.float32,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, K_SPLIT=k_split,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    if split > 1:
        summed = target.sum(dim=0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)
    return out


_SM_COUNT: dict[int, int] = {}
_PROGRAMS_PER_SM = 2  # split-K until about this many programs per SM
_MIN_K_TILES_PER_SPLIT = 4


def _split_k(programs: int, k: int, block_k: int, device: torch.device) -> int:
    """Split-K factor for a grid of `programs` tiles: enough programs to fill the GPU."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    split = 1
    while (programs * split < _PROGRAMS_PER_SM * _SM_COUNT[index]
           and k // (2 * split * block_k) >= _MIN_K_TILES_PER_SPLIT):
        split *= 2
    return split
