"""Fused mixture-of-experts: align tokens to experts, two grouped GEMMs, weighted combine.

Every token picked K experts (the router's top-k). Each (token, slot) pair p = t * K + k is one
row of work for expert topk_ids[t, k]. The pipeline, all launches of static shape (graph safe):

    align    topk_ids [T, K] -> sorted_ids [P]: pair ids grouped by expert, each expert's group
             padded with the sentinel T*K to a multiple of BLOCK_M, so a BLOCK_M-row tile never
             mixes experts; expert_ids [P / BLOCK_M] names each tile's expert;
             num_post [1] = P actually used (tiles at or past it exit at once).
    gate_up  inter[p] = silu(x[t] W13[e, :I]^T) * (x[t] W13[e, I:]^T)       [TK, I]
             one program = one tile of rows x BLOCK_N columns of both gate and up, so the
             SiLU-and-mul is fused into the epilogue and [TK, 2I] never exists.
    down     y[p] = inter[p] W2[e]^T                                        [TK, H]
    combine  out[t] = sum_k w[t, k] * y[t * K + k], fp32 sum, one rounding  [T, H]

    sorted_ids for E=3, BLOCK_M=4, pairs of experts (0: p0 p3) (1: none) (2: p1 p2 p4 p5 p6):
        | p0 p3 -- -- | p1 p2 p4 p5 | p6 -- -- -- | unused ...
          tile 0: e0    tile 1: e2    tile 2: e2     (-- = sentinel T*K, never read or written)

Expert parallelism: a pair whose expert id is outside [0, E) belongs to an expert another rank
holds. Align drops it (it gets no row), the GEMMs never see it, and the caller gives it weight 0,
which combine reads as "skip this row" (it was never written).

P is bounded by shapes alone: at most min(TK, E) experts are hit, each wastes < BLOCK_M rows, so
P <= TK + min(TK, E) * (BLOCK_M - 1). The grids cover that bound and idle tiles return early.

Half-precision inputs go to tensor cores with fp32 accumulation; fp32 inputs use IEEE dots (no
TF32) so fp32 runs match the references. The rounding points of the gated epilogue are those of
eager torch (gate and up rounded to the activation dtype, silu rounded, product rounded).

Dimension legend:
    T tokens, K experts per token (top-k), E experts, H hidden size, I expert intermediate size
    TK = T * K (token, slot) pairs, P padded pair slots, M tile rows (BLOCK_M)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoeTile:
    """Launch constants of both grouped GEMMs (they share BLOCK_M: one alignment serves both)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Largest token count T of each bucket -> tile; first bucket with T <= bound wins. Decode batches
# put few rows on each expert (bs 64 x top-8 over 128 experts: ~4 rows), so small BLOCK_M wastes
# the least padding; prefill fills tiles and wants the big ones. Re-derive on a GPU with
# `scripts/bench_moe.py --sweep` and copy the winners here (1024, 4096 and large: H100 sweep
# of 2026-11-25 on the Qwen3-30B-A3B shape, 10-24% faster than the first guesses).
MOE_TILES: dict[int, MoeTile] = {
    32: MoeTile(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
    256: MoeTile(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4),
    1024: MoeTile(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3),
    4096: MoeTile(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
}
MOE_TILE_LARGE = MoeTile(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)

# Elements per program of the 1-D helper kernels (count, scatter, combine columns).
ALIGN_BLOCK = 256
COMBINE_BLOCK = 1024

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def moe_tile(num_tokens: int) -> MoeTile:
    """The tuned tile for a batch of `num_tokens` tokens."""
    for bound, tile in MOE_TILES.items():
        if num_tokens <= bound:
            return tile
    return MOE_TILE_LARGE


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound P on the aligned length (a multiple of block_m) from shapes alone."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (sorted_ids [P], expert_ids [P / M], num_post [1]), all int32.

    Within an expert pairs are in increasing order here; the kernel may order them differently.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    size = max_padded_pairs(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((size,), num_pairs, dtype=torch.int32, device=flat.device)
    expert_ids = torch.full((size // block_m,), -1, dtype=torch.int32, device=flat.device)
    pos = 0
    for e in range(num_experts):
        pairs = (flat == e).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        sorted_ids[pos:pos + pairs.numel()] = pairs.int()
        padded = triton.cdiv(pairs.numel(), block_m) * block_m
        expert_ids[pos // block_m:(pos + padded) // block_m] = e
        pos += padded
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32, device=flat.device)


def moe_gemm_ref(a: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, gated: bool
                 ) -> torch.Tensor:
    """Per pair p: gated: silu(a[t] W[e, :I]^T) * a[t] W[e, I:]^T; else a[p] W[e]^T.

    a is [T, Kin] (gated, rows shared by a token's K pairs) or [TK, Kin]; w is [E, N', Kin].
    """
    flat = topk_ids.reshape(-1).long()
    rows = a.repeat_interleave(topk_ids.shape[1], dim=0) if gated else a
    out = torch.bmm(rows[:, None, :], w[flat].transpose(1, 2))[:, 0]  # [TK, N'] in a.dtype
    if gated:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out


def moe_combine_ref(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """y [TK, H], topk_weights [T, K] -> sum_k w[t, k] * y[t * K + k]  [T, H] (fp32 sum)."""
    num_tokens, top_k = topk_weights.shape
    acc = y.view(num_tokens, top_k, y.shape[1]).float() * topk_weights.float()[..., None]
    return acc.sum(1).to(y.dtype)


def fused_experts_ref(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] through the top-k experts, weighted sum -> [T, H]; loops over hit experts.

    The memory-lean path for CPU runs: gathers each expert's tokens, like transformers does.
    """
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in topk_ids.unique().tolist():
        if not 0 <= e < w13.shape[0]:
            continue  # another rank's expert (expert parallelism)
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(hidden[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])  # [n, H] in hidden.dtype
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    return out.to(hidden.dtype)


# ---------------------------------------------------------------------------------------------
# Alignment kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moe_count_kernel(ids_ptr, counts_ptr, ranks_ptr, num_pairs, num_experts,
                      BLOCK: tl.constexpr):
    # The atomic returns the count before this pair: its rank inside its expert's group.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    mask = (expert >= 0) & (expert < num_experts)  # others: another rank's experts (EP)
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=mask)
    tl.store(ranks_ptr + offs, rank, mask=mask)


@triton.jit
def _moe_offsets_kernel(counts_ptr, starts_ptr, expert_ids_ptr, num_post_ptr, num_experts,
                        num_tiles, BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr,
                        TILES: tl.constexpr):
    # One program: pad each count to a multiple of BLOCK_M, prefix-sum the padded counts into
    # group starts, then label every tile with the expert whose group covers its first row.
    e = tl.arange(0, EXPERTS)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(starts_ptr + e, ends - padded, mask=e < num_experts)
    total = tl.sum(padded, 0)
    tl.store(num_post_ptr, total)
    ends = tl.where(e < num_experts, ends, total + 1)  # padding lanes never count as passed
    # A while loop: the interpreter cannot take a runtime int as a `range` bound (numpy 2).
    first = 0
    while first < num_tiles:
        tile = first + tl.arange(0, TILES)
        row = tile * BLOCK_M
        expert = tl.sum((ends[None, :] <= row[:, None]).to(tl.int32), 1)
        expert = tl.where(row < total, expert, -1)
        tl.store(expert_ids_ptr + tile, expert, mask=tile < num_tiles)
        first += TILES


@triton.jit
def _moe_scatter_kernel(ids_ptr, ranks_ptr, starts_ptr, sorted_ptr, num_pairs, num_experts,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    mask = (expert >= 0) & (expert < num_experts)
    rank = tl.load(ranks_ptr + offs, mask=mask, other=0)
    start = tl.load(starts_ptr + expert, mask=mask, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=mask)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `moe_align_ref` (same groups and tiles; order inside a group may differ)."""
    assert topk_ids.dim() == 2 and topk_ids.dtype in _INDEX_DTYPES, (topk_ids.shape,
                                                                       topk_ids.dtype)
    assert topk_ids.is_contiguous() and num_experts >= 1
    assert block_m >= 16 and block_m & (block_m - 1) == 0, block_m
    num_pairs, device = topk_ids.numel(), topk_ids.device
    size = max_padded_pairs(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((size,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.empty(size // block_m, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    starts = torch.empty(num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_pairs, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_pairs, ALIGN_BLOCK),)
    if num_pairs:
        _moe_count_kernel[grid](topk_ids, counts, ranks, num_pairs, num_experts,
                                BLOCK=ALIGN_BLOCK)
    _moe_offsets_kernel[(1,)](counts, starts, expert_ids, num_post, num_experts,
                              expert_ids.numel(), BLOCK_M=block_m,
                              EXPERTS=triton.next_power_of_2(num_experts), TILES=64)
    if num_pairs:
        _moe_scatter_kernel[grid](topk_ids, ranks, starts, sorted_ids, num_pairs, num_experts,
                                  BLOCK=ALIGN_BLOCK)
    return sorted_ids, expert_ids, num_post


# ---------------------------------------------------------------------------------------------
# Grouped GEMM
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,
                     num_pairs, N, stride_am, stride_we, stride_wn, stride_om,
                     K: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (m, n): rows of tile m (one expert), output columns [n * BLOCK_N, +BLOCK_N).
    # Gated: W rows [0, N) are the gate, [N, 2N) the up projection; out column j = act(j).
    # K (H or I: two values per model) is a constexpr so the loop has a static trip count.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [M]
    row_mask = pairs < num_pairs
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]  # [M, BK]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & col_mask[None, :],
                           other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if GATED:
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = silu * acc_up.to(dtype).to(tl.float32)
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(dtype), mask=row_mask[:, None] & col_mask[None, :])


def moe_gemm(a: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
             expert_ids: torch.Tensor, num_post: torch.Tensor, top_k: int, gated: bool,
             tile: MoeTile) -> torch.Tensor:
    """Triton `moe_gemm_ref` over aligned pairs -> [TK, N] (N = I gated, else W's rows).

    a is [T, Kin] when gated (pair p reads row p // top_k), else [TK, Kin]; w is [E, N', Kin].
    """
    assert a.dim() == 2 and w.dim() == 3 and a.shape[1] == w.shape[2], (a.shape, w.shape)
    assert a.dtype == w.dtype and a.dtype in _FLOAT_DTYPES, (a.dtype, w.dtype)
    assert a.stride(1) == 1 and w.is_contiguous(), (a.stride(), w.stride())
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert sorted_ids.numel() == expert_ids.numel() * tile.block_m
    num_pairs = a.shape[0] * top_k if gated else a.shape[0]
    n_out = w.shape[1] // 2 if gated else w.shape[1]
    assert not gated or w.shape[1] % 2 == 0, w.shape
    out = torch.empty((num_pairs, n_out), dtype=a.dtype, device=a.device)
    if num_pairs == 0:
        return out
    grid = (expert_ids.numel(), triton.cdiv(n_out, tile.block_n))
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, expert_ids, num_post, num_pairs, n_out,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), K=a.shape[1],
        A_ROW_DIV=top_k if gated else 1, GATED=gated,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


# ---------------------------------------------------------------------------------------------
# Weighted combine
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moe_combine_kernel(y_ptr, w_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        weight = tl.load(w_ptr + tok * TOP_K + k).to(tl.float32)
        # A zero weight marks a pair another rank computes (EP): its row was never written.
        if weight != 0:
            y = tl.load(y_ptr + (tok * TOP_K + k) * H + cols, mask=mask, other=0.0)
            acc += weight * y.to(tl.float32)
    tl.store(out_ptr + tok * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Triton `moe_combine_ref`: y [TK, H] contiguous, topk_weights [T, K] -> [T, H]."""
    num_tokens, top_k = topk_weights.shape
    assert y.dim() == 2 and y.shape[0] == num_tokens * top_k and y.is_contiguous(), y.shape
    assert topk_weights.is_contiguous() and y.dtype in _FLOAT_DTYPES
    assert topk_weights.dtype in _FLOAT_DTYPES, topk_weights.dtype
    hidden = y.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    block = min(COMBINE_BLOCK, triton.next_power_of_2(hidden))
    _moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block))](
        y, topk_weights, out, hidden, TOP_K=top_k, BLOCK=block)
    return out


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  tile: MoeTile | None = None) -> torch.Tensor:
    """Triton `fused_experts_ref`: hidden [T, H], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]."""
    num_experts, inter2, hidden_size = w13.shape
    assert hidden.dim() == 2 and hidden.shape[1] == hidden_size, (hidden.shape, w13.shape)
    assert w2.shape == (num_experts, hidden_size, inter2 // 2), (w2.shape, w13.shape)
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == hidden.shape[0]
    tile = tile or moe_tile(hidden.shape[0])
    top_k = topk_ids.shape[1]
    sorted_ids, expert_ids, num_post = moe_align(topk_ids, num_experts, tile.block_m)
    inter = moe_gemm(hidden, w13, sorted_ids, expert_ids, num_post, top_k, True, tile)
    y = moe_gemm(inter, w2, sorted_ids, expert_ids, num_post, top_k, False, tile)
    return moe_combine(y, topk_weights)
