"""Multi-LoRA shrink and expand: one launch applies many adapters to a mixed batch (SGMV).

A batch's tokens each use one adapter slot (or none, slot -1). The adapters' weights sit in
stacked per-slot tensors, padded to the largest rank R, so one kernel launch serves every adapter
of the batch, whatever its size:

    shrink:  t[tok, :]        = x[tok, :] @ A[slot(tok)]^T          (fp32 [T, R], zero elsewhere)
    expand:  y[tok, :] += scale * t_l[tok, :] @ B_l[slot(tok)]^T        (in place, per slice l)

A packed layer (q|k|v, gate|up) has one A stack over all its slices (they read the same x: one
shrink gives t = [t_q | t_k | t_v]) and its slices' B matrices stacked on the output dim; one
expand launch writes every slice, each output tile reading its own slice's columns of t.

Tokens are grouped by slot, Punica's segmented (SGMV) layout: `sorted_token_ids` lists the tokens
of slot 0, then slot 1, ...; slot s owns sorted_token_ids[seg_start[s] : seg_start[s + 1]]. Tokens
with no adapter belong to no segment and are never touched. Segments are cut into row tiles of
TILE_M tokens, listed in a tile table: `tiles[i] = (slot, start, end)` (slot -1: no tile). Both
come from `lora_segments` / `lora_tiles` (or from host-side numpy in the workers, into persistent
device buffers).

One kernel does both: a gathered, segmented GEMM `out[tok] (+)= x[tok] @ W[slot]^T`. The grid is
(tiles * SPLIT_K, cdiv(N, BLOCK_N)): one program per (row tile, reduction split, column tile).
An eager launch knows the step's tile count; a CUDA graph captured at T tokens launches the bound
T // TILE_M + S, which covers every way T tokens can spread over S slots, and the programs of
unused table entries return at once (a T-row grid per slot would start S times as many). T is
not a compile-time constant (K, a model dimension, is): no recompilation per batch or sequence
length, and a graph captured at T replays any segment layout of up to T tokens.

Shrink reduces over the hidden size (thousands) into a narrow output (the rank): it splits the
reduction SPLIT_K ways so that enough programs run, each writing its own plane of partial sums
[SPLIT_K, T, R] (no zero-fill, no atomics); expand adds the planes as it loads them.

Dimension legend:
    T tokens, K reduced size (hidden size for shrink, rank for expand), N output columns,
    S adapter slots, R (padded) rank, P partial-sum planes (shrink's SPLIT_K)
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# Row tile: small, since at decode a slot owns few tokens. Tuning per kernel: (BLOCK_N, BLOCK_K,
# SPLIT_K, num_warps). Shrink's N is the rank (narrow), its K the hidden size (long, split).
TILE_M = 16
SHRINK_CONFIG = (64, 128, 8, 4)
EXPAND_CONFIG = (128, 32, 1, 4)
_MIN_DOT = 16  # tl.dot needs every block dim >= 16

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------- references


def lora_segments(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_slots [T] int (-1: none) -> (sorted_token_ids [T] int32, seg_start [S + 1] int32)."""
    slots = token_slots.long()
    order = torch.argsort(torch.where(slots < 0, num_slots, slots), stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slots.device)
    counts.index_add_(0, torch.where(slots < 0, num_slots, slots), torch.ones_like(slots))
    seg_start = torch.zeros(num_slots + 1, dtype=torch.int32, device=slots.device)
    seg_start[1:] = torch.cumsum(counts[:num_slots], 0).to(torch.int32)
    return order.to(torch.int32), seg_start


def max_lora_tiles(num_tokens: int, num_slots: int) -> int:
    """Most row tiles `num_tokens` tokens can need, however they spread over the slots."""
    return num_tokens // TILE_M + num_slots


def fill_lora_tiles(seg_start: np.ndarray, tiles: np.ndarray) -> int:
    """Write the row tiles of the segments `seg_start` [S + 1] into `tiles` [>= count, 3]
    int32 as (slot, start, end), the rest (-1, 0, 0); return the tile count."""
    starts = np.asarray(seg_start, dtype=np.int64)
    counts = -(-(starts[1:] - starts[:-1]) // TILE_M)  # tiles per slot
    n = int(counts.sum())
    slot = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)  # each tile's slot's first tile
    lo = starts[:-1][slot] + (np.arange(n) - first) * TILE_M
    tiles[:n, 0], tiles[:n, 1] = slot, lo
    tiles[:n, 2] = np.minimum(lo + TILE_M, starts[1:][slot])
    tiles[n:] = (-1, 0, 0)
    return n


def lora_tiles(seg_start: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The tile table of `seg_start` for up to `num_tokens` tokens: [bound, 3] int32."""
    tiles = np.empty((max_lora_tiles(num_tokens, seg_start.shape[0] - 1), 3), dtype=np.int32)
    fill_lora_tiles(seg_start.cpu().numpy(), tiles)
    return torch.from_numpy(tiles).to(seg_start.device)


def lora_shrink_ref(x: torch.Tensor, weights: torch.Tensor,
                    token_slots: torch.Tensor) -> torch.Tensor:
    """x [T, K], weights [S, R, K], token_slots [T] -> fp32 [T, R] (0 for tokens without one)."""
    out = torch.zeros((x.shape[0], weights.shape[1]), dtype=torch.float32, device=x.device)
    for slot in torch.unique(token_slots).tolist():
        if slot >= 0:
            rows = token_slots == slot
            out[rows] = (x[rows] @ weights[slot].T).float()
    return out


def lora_expand_ref(out: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                    token_slots: torch.Tensor, slice_sizes: list[int] | None = None,
                    scale: float = 1.0) -> None:
    """out [T, N] += scale * t_l @ weights[slot, rows of slice l]^T per slice l, in place.

    weights [S, N, R]: the slices' B matrices stacked on N (`slice_sizes`, default one slice);
    t [T, L*R]: slice l reads columns l*R:(l+1)*R. Tokens with slot -1 are left alone.
    """
    sizes = slice_sizes or [weights.shape[1]]
    rank = weights.shape[2]
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = token_slots == slot
        offset = 0
        for i, n in enumerate(sizes):
            part = t[rows, i * rank:(i + 1) * rank].to(weights.dtype)
            delta = part @ weights[slot, offset:offset + n].T
            out[rows, offset:offset + n] += (delta * scale).to(out.dtype)
            offset += n


# ---------------------------------------------------------------- kernel


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, out_ptr, token_ids_ptr, tiles_ptr, N, slice1, slice2,
                 stride_xp, stride_xt, stride_xk, stride_ws, stride_wn, stride_wk,
                 stride_op, stride_ot, stride_on, scale, num_tiles, K: tl.constexpr,
                 X_PARTS: tl.constexpr, ACCUMULATE: tl.constexpr, SPLIT_K: tl.constexpr,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tile, pid_k = pid % num_tiles, pid // num_tiles
    slot = tl.load(tiles_ptr + tile * 3)
    if slot < 0:
        return
    lo = tl.load(tiles_ptr + tile * 3 + 1)
    hi = tl.load(tiles_ptr + tile * 3 + 2)
    offs_m = lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < hi
    tok = tl.load(token_ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # Expand of a packed layer: output columns [slice1, slice2) are slice 1, [slice2, N) slice
    # 2; slice l reads x columns l*K.. (a tile never straddles a slice boundary).
    x_base = x_ptr + ((n0 >= slice1).to(tl.int64) + (n0 >= slice2).to(tl.int64)) * K * stride_xk
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # This program's share of the reduction: chunks pid_k, pid_k + SPLIT_K, ...
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_ptrs = x_base + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk
        a_mask = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
        for p in tl.static_range(1, X_PARTS):  # expand: add shrink's partial-sum planes
            a += tl.load(a_ptrs + p * stride_xp, mask=a_mask, other=0.0).to(tl.float32)
        b = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        a = a.to(b.dtype)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    acc = acc * scale
    out_ptrs = out_ptr + pid_k * stride_op + tok[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
            sorted_token_ids: torch.Tensor, tiles: torch.Tensor, num_tiles: int | None,
            scale: float, accumulate: bool, config: tuple[int, int, int, int],
            slice_sizes: list[int] | None = None) -> None:
    """x [P, T, K] (P partial planes, summed on load), out [SPLIT_K, T, N] or [T, N]."""
    num_tokens = x.shape[1]
    num_slots, n, k = weights.shape
    bound = min(max_lora_tiles(num_tokens, num_slots), tiles.shape[0])
    num_tiles = bound if num_tiles is None else min(num_tiles, bound)
    if num_tokens == 0 or n == 0 or num_tiles == 0:
        return
    block_n, block_k, _, num_warps = config  # SPLIT_K: the planes `out` was allocated with
    block_n = max(_MIN_DOT, min(block_n, triton.next_power_of_2(n)))
    sizes = slice_sizes or [n]
    assert 1 <= len(sizes) <= 3 and sum(sizes) == n, (sizes, n)
    bounds = [sum(sizes[:i]) for i in (1, 2)]  # slice starts (n when there is no such slice)
    while any(b % block_n for b in bounds if b < n):  # tiles must not straddle two slices
        block_n //= 2
    assert block_n >= _MIN_DOT, f"slice sizes {sizes} must be multiples of {_MIN_DOT}"
    block_k = _block_k(block_k, k)
    split_k = out.shape[0] if out.dim() == 3 else 1
    stride_op = out.stride(0) if out.dim() == 3 else 0
    grid = (num_tiles * split_k, triton.cdiv(n, block_n))
    _sgmv_kernel[grid](
        x, weights, out, sorted_token_ids, tiles, n, min(bounds[0], n), min(bounds[1], n),
        x.stride(0), x.stride(1), x.stride(2), weights.stride(0), weights.stride(1),
        weights.stride(2), stride_op, out.stride(-2), out.stride(-1), scale, num_tiles, K=k,
        X_PARTS=x.shape[0], ACCUMULATE=accumulate, SPLIT_K=split_k,
        IEEE=weights.dtype == torch.float32, BLOCK_M=TILE_M, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps)


def shrink_splits(hidden_size: int) -> int:
    """How many partial planes `lora_shrink` writes for a reduction over `hidden_size`."""
    _, block_k, split_k, _ = SHRINK_CONFIG
    return max(1, min(split_k, triton.cdiv(hidden_size, _block_k(block_k, hidden_size))))


def _block_k(block_k: int, k: int) -> int:
    # One rule for the launch and `shrink_splits`: the planes a shrink writes depend on it.
    return max(_MIN_DOT, min(block_k, triton.next_power_of_2(k)))


def _check(x: torch.Tensor, weights: torch.Tensor, sorted_token_ids: torch.Tensor,
           tiles: torch.Tensor, num_slices: int = 1) -> None:
    assert x.dim() == 3 and weights.dim() == 3, (x.shape, weights.shape)
    assert x.shape[2] == weights.shape[2] * num_slices, (x.shape, weights.shape, num_slices)
    assert weights.dtype in _FLOAT_DTYPES and x.dtype in _FLOAT_DTYPES, (x.dtype, weights.dtype)
    assert sorted_token_ids.dtype == torch.int32 and tiles.dtype == torch.int32
    assert sorted_token_ids.shape[0] >= x.shape[1], (sorted_token_ids.shape, x.shape)
    assert tiles.dim() == 2 and tiles.shape[1] == 3 and tiles.is_contiguous(), tiles.shape
    assert x.device == weights.device == sorted_token_ids.device == tiles.device


def lora_shrink(x: torch.Tensor, weights: torch.Tensor, sorted_token_ids: torch.Tensor,
                tiles: torch.Tensor, num_tiles: int | None = None) -> torch.Tensor:
    """Triton `lora_shrink_ref` over segments: x [T, K], weights [S, R, K] -> fp32 partial
    sums [P, T, R] (P = `shrink_splits(K)`): their sum over P is x @ A[slot]^T for the tokens
    of a segment; rows of tokens without an adapter are left unwritten.

    num_tiles: the tile table's entry count when the caller knows it (host int, eager
    launches); None launches the bound for T tokens (what a CUDA graph must capture).
    """
    _check(x[None], weights, sorted_token_ids, tiles)
    out = torch.empty((shrink_splits(x.shape[1]), x.shape[0], weights.shape[1]),
                      dtype=torch.float32, device=x.device)
    _launch(x[None], weights, out, sorted_token_ids, tiles, num_tiles, 1.0, False,
            SHRINK_CONFIG)
    return out


def lora_expand(out: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                sorted_token_ids: torch.Tensor, tiles: torch.Tensor,
                slice_sizes: list[int] | None = None, scale: float = 1.0,
                num_tiles: int | None = None) -> None:
    """Triton `lora_expand_ref` over segments, every slice in one launch: out [T, N] +=
    scale * t (slice l: columns l*R..) @ weights[slot]^T per slice, weights [S, N, R].

    t: [T, L*R], or shrink's partial sums [P, T, L*R] (added up here). `out` may itself be a
    column slice of a wider tensor. Slice sizes must be multiples of 16. num_tiles: as in
    `lora_shrink`.
    """
    t = t if t.dim() == 3 else t[None]
    num_slices = len(slice_sizes) if slice_sizes else 1
    _check(t, weights, sorted_token_ids, tiles, num_slices)
    assert out.dim() == 2 and out.shape == (t.shape[1], weights.shape[1]), (out.shape, t.shape)
    assert out.dtype in _FLOAT_DTYPES and out.device == t.device
    _launch(t, weights, out, sorted_token_ids, tiles, num_tiles, scale, True, EXPAND_CONFIG,
            slice_sizes)
