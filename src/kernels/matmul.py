"""Batch-invariant linear layer: y = x W^T (+ b) whose rows do not depend on the batch.

cuBLAS picks its algorithm (tile shape, split-K) from the problem shape, so the same input row
can round differently when the number of rows T changes. The Triton kernel here always uses one
tile configuration per dtype and never splits K: every output element is reduced over K in
BLOCK_K chunks in the same order, whatever T is and wherever the row sits in its tile. This is
what `--batch-invariant` needs; it is slower than cuBLAS (no autotuning by shape), a trade-off
taken on purpose.

`batch_invariant_linear_ref` is the CPU path: one `F.linear` call per row, so every row goes
through the same (1, K) x (K, N) product whatever the batch.

Dimension legend: T rows (tokens), K input features, N output features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


class MatmulTile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One configuration per dtype, never chosen by shape: that is the invariance.
MATMUL_TILES: dict[torch.dtype, MatmulTile] = {
    torch.bfloat16: MatmulTile(64, 128, 64, 8, 3),
    torch.float16: MatmulTile(64, 128, 64, 8, 3),
    torch.float32: MatmulTile(32, 32, 32, 4, 2),
}


def batch_invariant_linear_ref(x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T (+ bias [N]) -> [T, N], one row at a time."""
    if x.shape[0] == 0:
        return F.linear(x, weight, bias)
    return torch.cat([F.linear(x[i: i + 1], weight, bias) for i in range(x.shape[0])])


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, N, K: tl.constexpr, stride_xt, stride_xk,
                   stride_wn, stride_wk, stride_yt, stride_yn, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is constexpr: the interpreter needs an int bound
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + k[None, :] * stride_xk,
                    mask=(rows[:, None] < T) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + k[:, None] * stride_wk,
                    mask=(cols[None, :] < N) & (k[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows[:, None].to(tl.int64) * stride_yt + cols[None, :] * stride_yn
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < T) & (cols[None, :] < N))


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `batch_invariant_linear_ref`: x [T, K], weight [N, K], bias [N] -> [T, N]."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (
        x.shape, weight.shape)
    assert x.dtype == weight.dtype and x.dtype in MATMUL_TILES, (x.dtype, weight.dtype)
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous())
    (num_rows, k), n = x.shape, weight.shape[0]
    y = x.new_empty((num_rows, n))
    if num_rows == 0:
        return y
    tile = MATMUL_TILES[x.dtype]
    grid = (triton.cdiv(num_rows, tile.block_m), triton.cdiv(n, tile.block_n))
    _matmul_kernel[grid](
        x, weight, bias if bias is not None else y, y, num_rows, n, k, x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y
