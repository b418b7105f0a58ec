"""Multi-LoRA shrink/expand kernels (SGMV) against their torch references.

CPU tensors run in the Triton interpreter (fp32/fp16), CUDA tensors compiled (skipped without a
GPU). Batches mix tokens of several adapter slots, tokens with none (-1), and slots of different
effective ranks (zero padding past an adapter's rank, as the workers store them).

Dimension legend: T tokens, K hidden size, R padded rank, N output columns, S slots.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kernels.lora import (
    TILE_M,
    fill_lora_tiles,
    lora_expand,
    lora_expand_ref,
    lora_segments,
    lora_shrink,
    lora_shrink_ref,
    lora_tiles,
    max_lora_tiles,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
CASES = ([("cpu", dt) for dt in (torch.float32, torch.float16)] if INTERPRET else []) + (
    [("cuda", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)] if CUDA else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

pytestmark = pytest.mark.skipif(not CASES, reason="needs the interpreter or a CUDA device")


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 0.3).to(device=device, dtype=dtype)


def stacked(num_slots: int, rows: int, cols: int, ranks: list[int], rank_dim: int,
            dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """[S, rows, cols] weights, zero past each slot's rank along `rank_dim` (1 or 2)."""
    w = randn(num_slots, rows, cols, dtype=dtype, device=device, seed=seed)
    for s, r in enumerate(ranks):
        if rank_dim == 1:
            w[s, r:] = 0
        else:
            w[s, :, r:] = 0
    return w


def slots_of(num_tokens: int, num_slots: int, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, num_slots, (num_tokens,), generator=gen).to(device)


def segments(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_token_ids, tile table) of a token -> slot mapping."""
    ids, seg = lora_segments(token_slots, num_slots)
    return ids, lora_tiles(seg, token_slots.shape[0])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 37])
def test_shrink_matches_ref(device: str, dtype: torch.dtype, num_tokens: int) -> None:
    num_slots, k, r = 3, 200, 16
    x = randn(num_tokens, k, dtype=dtype, device=device, seed=1)
    a = stacked(num_slots, r, k, [4, 16, 8], rank_dim=1, dtype=dtype, device=device, seed=2)
    token_slots = slots_of(num_tokens, num_slots, seed=3, device=device)
    ids, tiles = segments(token_slots, num_slots)
    parts = lora_shrink(x, a, ids, tiles)  # [P, T, R] partial sums
    assert parts.shape[1:] == (num_tokens, r) and parts.dtype == torch.float32
    used = token_slots >= 0  # rows of tokens without an adapter are never read
    want = lora_shrink_ref(x, a, token_slots)
    torch.testing.assert_close(parts.sum(0)[used], want[used], atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.all(want[~used] == 0)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("num_tokens", [1, 6, 40])
def test_expand_into_column_slice(device: str, dtype: torch.dtype, num_tokens: int) -> None:
    num_slots, r, n, width, offset = 4, 16, 72, 150, 40
    t = randn(num_tokens, 2 * r, dtype=torch.float32, device=device, seed=4)[:, r:]  # strided
    b = stacked(num_slots, n, r, [2, 16, 8, 4], rank_dim=2, dtype=dtype, device=device, seed=5)
    y = randn(num_tokens, width, dtype=dtype, device=device, seed=6)
    token_slots = slots_of(num_tokens, num_slots, seed=7, device=device)
    ids, tiles = segments(token_slots, num_slots)
    want = y.clone()
    lora_expand_ref(want[:, offset:offset + n], t, b, token_slots, scale=0.5)
    lora_expand(y[:, offset:offset + n], t, b, ids, tiles, scale=0.5)
    torch.testing.assert_close(y, want, atol=TOL[dtype], rtol=TOL[dtype])
    # Columns outside the slice and tokens without an adapter are untouched.
    before = randn(num_tokens, width, dtype=dtype, device=device, seed=6)
    assert torch.equal(y[:, :offset], before[:, :offset])
    assert torch.equal(y[:, offset + n:], before[:, offset + n:])
    assert torch.equal(y[token_slots < 0], before[token_slots < 0])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("sizes", [[64, 32, 32], [48, 48], [16, 96, 16]])
def test_expand_packed_slices_one_launch(device: str, dtype: torch.dtype,
                                         sizes: list[int]) -> None:
    """q|k|v (or gate|up): slice l of the output reads columns l*R.. of t, in one launch."""
    num_slots, r, num_tokens = 3, 16, 21
    t = randn(num_tokens, len(sizes) * r, dtype=torch.float32, device=device, seed=20)
    b = stacked(num_slots, sum(sizes), r, [16, 4, 8], rank_dim=2, dtype=dtype, device=device,
                seed=21)
    y = randn(num_tokens, sum(sizes), dtype=dtype, device=device, seed=22)
    token_slots = slots_of(num_tokens, num_slots, seed=23, device=device)
    ids, tiles = segments(token_slots, num_slots)
    want = y.clone()
    offset = 0
    for i, n in enumerate(sizes):  # slice by slice, written out: the reference's contract
        lora_expand_ref(want[:, offset:offset + n], t[:, i * r:(i + 1) * r],
                        b[:, offset:offset + n], token_slots)
        offset += n
    lora_expand(y, t, b, ids, tiles, sizes)
    torch.testing.assert_close(y, want, atol=TOL[dtype], rtol=TOL[dtype])
    got_ref = randn(num_tokens, sum(sizes), dtype=dtype, device=device, seed=22)
    lora_expand_ref(got_ref, t, b, token_slots, sizes)
    torch.testing.assert_close(got_ref, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device,dtype", CASES[:1])
def test_segments_layout(device: str, dtype: torch.dtype) -> None:
    token_slots = torch.tensor([2, -1, 0, 2, 0, -1, 1], device=device)
    ids, seg = lora_segments(token_slots, 3)
    assert seg.tolist() == [0, 2, 3, 5]
    assert ids[:5].tolist() == [2, 4, 6, 0, 3]  # slot 0's tokens, slot 1's, slot 2's


def test_tile_table_covers_every_segment_once() -> None:
    """Tiles of at most TILE_M rows cut each segment in order; unused entries are (-1, 0, 0);
    the bound holds for the worst spread (every slot one token past a tile boundary)."""
    m, num_slots = TILE_M, 4
    counts = [0, 2 * m + 1, m, 3]
    seg = np.concatenate([[0], np.cumsum(counts)])
    tiles = np.full((max_lora_tiles(sum(counts), num_slots), 3), 7, dtype=np.int32)
    n = fill_lora_tiles(seg, tiles)
    assert n == 3 + 1 + 1
    start = int(seg[1])
    assert tiles[:n].tolist() == [[1, start, start + m], [1, start + m, start + 2 * m],
                                  [1, start + 2 * m, start + 2 * m + 1],
                                  [2, seg[2], seg[2] + m], [3, seg[3], seg[3] + 3]]
    assert (tiles[n:] == [-1, 0, 0]).all()
    worst = [m + 1] * num_slots
    bound = max_lora_tiles(sum(worst), num_slots)
    assert fill_lora_tiles(np.concatenate([[0], np.cumsum(worst)]),
                           np.empty((bound, 3), np.int32)) <= bound


@pytest.mark.parametrize("device,dtype", CASES)
def test_same_launch_shape_serves_any_mix(device: str, dtype: torch.dtype) -> None:
    """One (T, shapes) launch for different adapter mixes: what a CUDA-graph replay relies on."""
    num_slots, k, r, num_tokens = 2, 64, 16, 9
    x = randn(num_tokens, k, dtype=dtype, device=device, seed=8)
    a = stacked(num_slots, r, k, [16, 16], rank_dim=1, dtype=dtype, device=device, seed=9)
    for seed in range(3):
        token_slots = slots_of(num_tokens, num_slots, seed=10 + seed, device=device)
        ids, tiles = segments(token_slots, num_slots)
        used = token_slots >= 0
        torch.testing.assert_close(lora_shrink(x, a, ids, tiles).sum(0)[used],
                                   lora_shrink_ref(x, a, token_slots)[used],
                                   atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device,dtype", CASES)
def test_grid_sized_to_the_tile_count(device: str, dtype: torch.dtype) -> None:
    """num_tiles (the host's count) covers every tile: the same result as the bound's grid;
    one tile short leaves the last tile's rows out."""
    num_slots, k, r, n, num_tokens = 3, 32, 16, 48, 100
    x = randn(num_tokens, k, dtype=dtype, device=device, seed=30)
    a = stacked(num_slots, r, k, [16, 8, 4], rank_dim=1, dtype=dtype, device=device, seed=31)
    b = stacked(num_slots, n, r, [16, 8, 4], rank_dim=2, dtype=dtype, device=device, seed=32)
    token_slots = slots_of(num_tokens, num_slots, seed=33, device=device)
    ids, tiles = segments(token_slots, num_slots)
    count = int((tiles[:, 0] >= 0).sum())
    assert count < tiles.shape[0]  # the bound launches more programs than there are tiles
    used = token_slots >= 0
    full, exact = (lora_shrink(x, a, ids, tiles, m).sum(0) for m in (None, count))
    torch.testing.assert_close(exact[used], full[used], atol=0, rtol=0)
    base = randn(num_tokens, n, dtype=dtype, device=device, seed=34)
    out_full, out_exact, out_short = base.clone(), base.clone(), base.clone()
    lora_expand(out_full, full, b, ids, tiles)
    lora_expand(out_exact, full, b, ids, tiles, num_tiles=count)
    torch.testing.assert_close(out_exact, out_full, atol=0, rtol=0)
    lora_expand(out_short, full, b, ids, tiles, num_tiles=count - 1)
    last = ids[int(tiles[count - 1, 1]): int(tiles[count - 1, 2])].long()
    assert torch.equal(out_short[last], base[last])  # the bound is used


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_linear_cuda_graph_replays_any_adapter_mix(dtype: torch.dtype) -> None:
    """A packed LoRALinear captured once in a CUDA graph, replayed with new token -> slot
    mappings written to the persistent buffers, matches the torch reference every time."""
    from workers.lora_layers import LoRABatch, LoRALinear

    num_tokens, num_slots, rank, hidden, sizes = 40, 4, 16, 256, [256, 64, 64]
    base = torch.nn.Linear(hidden, sum(sizes), bias=False).to("cuda", dtype)
    max_tiles = max_lora_tiles(64, num_slots)
    batch = LoRABatch(token_slots=torch.full((64,), -1, dtype=torch.int32, device="cuda"),
                      sorted_token_ids=torch.zeros(64, dtype=torch.int32, device="cuda"),
                      tiles=torch.full((max_tiles, 3), -1, dtype=torch.int32, device="cuda"),
                      active=True, kernels=True)
    layer = LoRALinear(base, hidden, sizes, num_slots, rank, batch)
    for slot, r in enumerate([16, 4, 8, 2]):
        layer.set_slot(slot, [(randn(r, hidden, dtype=dtype, device="cuda", seed=slot * 3 + i),
                               randn(n, r, dtype=dtype, device="cuda", seed=50 + slot * 3 + i))
                              for i, n in enumerate(sizes)])
    x = randn(num_tokens, hidden, dtype=dtype, device="cuda", seed=99)
    with torch.inference_mode():
        layer(x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        for seed in range(4):
            slots = slots_of(num_tokens, num_slots, seed=seed, device="cuda").int()
            if seed == 3:
                slots[:] = 1  # every token on one slot: the most tiles one slot can have
            ids, seg = lora_segments(slots, num_slots)
            batch.sorted_token_ids[:num_tokens].copy_(ids)
            batch.tiles[:] = lora_tiles(seg, 64)[:max_tiles]
            graph.replay()
            want = base(x)
            t = lora_shrink_ref(x, layer.lora_a, slots)
            lora_expand_ref(want, t, layer.lora_b, slots, sizes)
            torch.testing.assert_close(out, want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
