"""Fused-MoE kernels (align, grouped GEMMs, combine) against their torch references.

CPU tensors run in the Triton interpreter (fp32/fp16: the interpreter rounds bf16 wrongly), CUDA
tensors compiled (conftest turns the interpreter on unless the GPU run sets TRITON_INTERPRET=0).
The layer-level tests (`select_experts`, `FusedMoE` loading) need neither.

Dimension legend: T tokens, K experts per token, E experts, H hidden, I expert intermediate,
TK = T * K pairs, P padded pair slots.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.moe import (
    MOE_TILE_LARGE,
    MOE_TILES,
    MoeTile,
    fused_experts,
    fused_experts_ref,
    max_padded_pairs,
    moe_align,
    moe_align_ref,
    moe_combine,
    moe_combine_ref,
    moe_gemm,
    moe_gemm_ref,
    moe_tile,
)
from workers.moe import FusedMoE, select_experts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
CASES = ([("cpu", dt) for dt in (torch.float32, torch.float16)] if INTERPRET else []) + (
    [("cuda", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)] if CUDA else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SMALL = MoeTile(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)

needs_triton = pytest.mark.skipif(not DEVICES, reason="needs the interpreter or a CUDA device")


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
          scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def random_topk(num_tokens: int, top_k: int, num_experts: int, seed: int,
                device: str = "cpu") -> torch.Tensor:
    """[T, K] int32: K distinct experts per token, like a router's top-k."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]
    ids = torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.int64)
    return ids.to(device=device, dtype=torch.int32)


def groups_as_sets(sorted_ids: torch.Tensor, expert_ids: torch.Tensor, num_post: int,
                   block_m: int) -> dict[int, set[int]]:
    """expert -> the pairs in its tiles. Pairs may sit in any of their expert's tiles: on the GPU
    ranks come from atomics, so which of an expert's tiles holds a pair varies run to run."""
    groups: dict[int, set[int]] = {}
    for tile, i in enumerate(range(0, num_post, block_m)):
        groups.setdefault(int(expert_ids[tile]), set()).update(sorted_ids[i:i + block_m].tolist())
    return groups


# ---------------------------------------------------------------- align


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [
    (0, 2, 4, 16), (1, 2, 8, 16), (7, 2, 5, 16), (40, 4, 6, 16), (33, 1, 3, 32),
    (5, 8, 128, 16)])
def test_align_matches_ref(device: str, num_tokens: int, top_k: int, num_experts: int,
                           block_m: int) -> None:
    ids = random_topk(num_tokens, top_k, num_experts, seed=num_tokens, device=device)
    got = [t.cpu() for t in moe_align(ids, num_experts, block_m)]
    want = moe_align_ref(ids.cpu(), num_experts, block_m)
    size = max_padded_pairs(ids.numel(), num_experts, block_m)
    assert got[0].shape == (size,) and got[1].shape == (size // block_m,)
    assert torch.equal(got[2], want[2])
    assert torch.equal(got[1], want[1])  # tile -> expert, -1 past the end
    num_post = int(want[2])
    # Same pairs in every expert's group of tiles (order inside a group is free), sentinel
    # elsewhere; every tile but an expert's last is full (no sentinel inside a group's body).
    assert groups_as_sets(got[0], got[1], num_post, block_m) == \
        groups_as_sets(want[0], want[1], num_post, block_m)
    for tile, i in enumerate(range(0, num_post, block_m)):
        if tile + 1 < num_post // block_m and got[1][tile + 1] == got[1][tile]:
            assert (got[0][i:i + block_m] < ids.numel()).all()
    assert (got[0][num_post:] == ids.numel()).all()


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_align_all_tokens_on_one_expert(device: str) -> None:
    ids = torch.full((37, 1), 2, dtype=torch.int32, device=device)
    sorted_ids, expert_ids, num_post = (t.cpu() for t in moe_align(ids, 4, 16))
    assert int(num_post) == 48
    assert expert_ids[:3].tolist() == [2, 2, 2] and (expert_ids[3:] == -1).all()
    assert sorted(sorted_ids[:37].tolist()) == list(range(37))
    assert (sorted_ids[37:] == 37).all()


def test_padded_bound_holds_for_adversarial_routing() -> None:
    # Every hit expert gets one pair: the most padding a routing can cause.
    for num_tokens, top_k, num_experts in [(3, 2, 64), (64, 8, 128), (100, 2, 8)]:
        ids = torch.arange(num_tokens * top_k).remainder(num_experts).view(num_tokens, top_k)
        _, _, num_post = moe_align_ref(ids, num_experts, 16)
        assert int(num_post) <= max_padded_pairs(ids.numel(), num_experts, 16)


def test_tile_table_is_ordered_and_aligned() -> None:
    assert list(MOE_TILES) == sorted(MOE_TILES)
    assert moe_tile(1) == MOE_TILES[min(MOE_TILES)]
    assert moe_tile(max(MOE_TILES) + 1) == MOE_TILE_LARGE
    for tile in [*MOE_TILES.values(), MOE_TILE_LARGE]:
        assert tile.block_m >= 16 and tile.block_m & (tile.block_m - 1) == 0


# ---------------------------------------------------------------- grouped GEMM and combine


@needs_triton
@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_moe_gemm_matches_ref(device: str, dtype: torch.dtype, gated: bool,
                              num_tokens: int) -> None:
    top_k, num_experts, k_in, n_out = 2, 5, 40, 24  # K dims not multiples of the tile
    ids = random_topk(num_tokens, top_k, num_experts, seed=3, device=device)
    rows = num_tokens if gated else num_tokens * top_k
    a = randn(rows, k_in, seed=1, dtype=dtype, device=device)
    w = randn(num_experts, 2 * n_out if gated else n_out, k_in, seed=2, dtype=dtype,
              device=device, scale=0.2)
    sorted_ids, expert_ids, num_post = moe_align(ids, num_experts, SMALL.block_m)
    got = moe_gemm(a, w, sorted_ids, expert_ids, num_post, top_k, gated, SMALL)
    want = moe_gemm_ref(a, w, ids, gated)
    assert got.shape == want.shape == (num_tokens * top_k, n_out) and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens,top_k,hidden", [(0, 2, 8), (1, 1, 24), (6, 3, 1100)])
def test_moe_combine_matches_ref(device: str, dtype: torch.dtype, num_tokens: int, top_k: int,
                                 hidden: int) -> None:
    y = randn(num_tokens * top_k, hidden, seed=4, dtype=dtype, device=device)
    weights = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(5))
    weights = weights.to(device)
    got = moe_combine(y, weights)
    torch.testing.assert_close(got, moe_combine_ref(y, weights), atol=TOL[dtype],
                               rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens,top_k,num_experts,tile", [
    (0, 2, 4, SMALL), (1, 2, 8, SMALL), (13, 2, 4, SMALL), (5, 3, 6, None)])
def test_fused_experts_matches_ref(device: str, dtype: torch.dtype, num_tokens: int,
                                   top_k: int, num_experts: int, tile: MoeTile | None) -> None:
    hidden, inter = 48, 20
    x = randn(num_tokens, hidden, seed=6, dtype=dtype, device=device)
    w13 = randn(num_experts, 2 * inter, hidden, seed=7, dtype=dtype, device=device, scale=0.2)
    w2 = randn(num_experts, hidden, inter, seed=8, dtype=dtype, device=device, scale=0.2)
    ids = random_topk(num_tokens, top_k, num_experts, seed=9, device=device)
    weights = torch.softmax(randn(num_tokens, top_k, seed=10), -1).to(device)
    got = fused_experts(x, w13, w2, weights, ids, tile)
    want = fused_experts_ref(x, w13, w2, weights, ids)
    assert got.shape == (num_tokens, hidden) and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_experts_ref_is_a_per_token_loop() -> None:
    """The reference against the definition, one token and one expert at a time."""
    x, w13, w2 = randn(4, 8, seed=11), randn(3, 10, 8, seed=12), randn(3, 8, 5, seed=13)
    ids = random_topk(4, 2, 3, seed=14)
    weights = torch.rand(4, 2, generator=torch.Generator().manual_seed(15))
    want = torch.zeros(4, 8)
    for t in range(4):
        for k in range(2):
            gate, up = (w13[ids[t, k]] @ x[t]).chunk(2)
            want[t] += weights[t, k] * (w2[ids[t, k]] @ (F.silu(gate) * up))
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, weights, ids), want)
    flat = moe_gemm_ref(moe_gemm_ref(x, w13, ids, True), w2, ids, False)
    torch.testing.assert_close(moe_combine_ref(flat, weights), want)


# ---------------------------------------------------------------- FusedMoE layer


def test_select_experts_renormalizes_only_when_asked() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
    weights, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.dtype == torch.int32 and ids.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(weights, probs.gather(1, ids.long()))
    normed, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(normed.sum(-1), torch.ones(2))
    torch.testing.assert_close(normed, weights / weights.sum(-1, keepdim=True))


def test_fused_moe_weight_loader_fills_each_expert_slice() -> None:
    layer = FusedMoE(num_experts=3, top_k=2, hidden_size=4, intermediate_size=2,
                     renormalize=True)
    w13, w2 = layer.w13_weight, layer.w2_weight
    assert w13.shape == (3, 4, 4) and w2.shape == (3, 4, 2)
    assert w13.expected_shards == {(e, j) for e in range(3) for j in (0, 1)}
    assert w2.expected_shards == {(e, None) for e in range(3)}
    w13.data.zero_()
    w13.weight_loader(w13, torch.full((2, 4), 7.0), (1, 1))  # expert 1, up_proj
    assert (w13[1, 2:] == 7).all() and w13[1, :2].abs().sum() == 0 and w13[0].abs().sum() == 0
    w2.weight_loader(w2, torch.ones(4, 2), (2, None))
    assert (w2[2] == 1).all()
    with pytest.raises(ValueError, match="shape mismatch"):
        w13.weight_loader(w13, torch.zeros(3, 4), (0, 0))


def test_fused_moe_forward_routes_each_token() -> None:
    torch.manual_seed(0)
    layer = FusedMoE(num_experts=4, top_k=2, hidden_size=8, intermediate_size=6,
                     renormalize=False)
    layer.w13_weight.data.normal_()
    layer.w2_weight.data.normal_()
    x, logits = torch.randn(5, 8), torch.randn(5, 4)
    want = torch.zeros(5, 8)
    probs = torch.softmax(logits, -1)
    for t in range(5):
        for e in probs[t].topk(2).indices.tolist():
            gate, up = (layer.w13_weight[e] @ x[t]).chunk(2)
            want[t] += probs[t, e] * (layer.w2_weight[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(layer(x, logits), want)
    if CUDA:  # the Triton path agrees with the CPU path
        cuda_layer = layer.cuda()
        torch.testing.assert_close(cuda_layer(x.cuda(), logits.cuda()).cpu(), want,
                                   atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_expert_parallel_shards_sum_to_the_whole(device: str, dtype: torch.dtype) -> None:
    """EP: each "rank" keeps pairs of its experts (others: id -1, weight 0); outputs add up."""
    num_tokens, top_k, num_experts, ranks, hidden, inter = 9, 2, 4, 2, 32, 16
    x = randn(num_tokens, hidden, seed=21, dtype=dtype, device=device)
    w13 = randn(num_experts, 2 * inter, hidden, seed=22, dtype=dtype, device=device, scale=0.2)
    w2 = randn(num_experts, hidden, inter, seed=23, dtype=dtype, device=device, scale=0.2)
    ids = random_topk(num_tokens, top_k, num_experts, seed=24, device=device)
    weights = torch.softmax(randn(num_tokens, top_k, seed=25), -1).to(device)
    want = fused_experts_ref(x, w13, w2, weights, ids).float()
    local = num_experts // ranks
    total_ref, total = torch.zeros_like(want), torch.zeros_like(want)
    for rank in range(ranks):
        shifted = ids - rank * local
        mine = (shifted >= 0) & (shifted < local)
        rank_ids = shifted.masked_fill(~mine, -1).contiguous()
        rank_w = weights.masked_fill(~mine, 0.0).contiguous()
        experts = slice(rank * local, (rank + 1) * local)
        args = (x, w13[experts].contiguous(), w2[experts].contiguous(), rank_w, rank_ids)
        total_ref += fused_experts_ref(*args).float()
        total += fused_experts(*args, SMALL).float()
    torch.testing.assert_close(total_ref, want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(total, want, atol=TOL[dtype], rtol=TOL[dtype])
