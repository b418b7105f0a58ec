"""Which slice of each checkpoint tensor every tensor-parallel rank keeps (no processes).

Layers are built for each rank of a 2-rank group and loaded with whole checkpoint tensors; the
slices they keep must tile (or, for replicated kv heads, repeat) the original. Forward passes
need the collectives and are checked end to end in tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from workers.moe import FusedMoE
from workers.parallel import TPGroup
from workers.parallel_layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_head_shard,
)

RANKS = [TPGroup(0, 2), TPGroup(1, 2)]


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def load(param: torch.nn.Parameter, tensor: torch.Tensor, shard: object = None) -> None:
    if shard is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard)


def test_qkv_replicates_a_single_kv_head_and_splits_query_heads() -> None:
    d, hidden = 4, 8
    q, k, v = rand(4 * d, hidden, seed=1), rand(d, hidden, seed=2), rand(d, hidden, seed=3)
    for tp in RANKS:
        layer = QKVParallelLinear(hidden, d, num_heads=4, num_kv_heads=1, tp=tp)
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            load(layer.weight, tensor, name)
        q_rows = q[tp.rank * 2 * d: (tp.rank + 1) * 2 * d]
        torch.testing.assert_close(layer.weight.data, torch.cat([q_rows, k, v]), rtol=0, atol=0)


def test_kv_heads_split_evenly_or_fail_clearly() -> None:
    assert [kv_head_shard(4, tp) for tp in RANKS] == [(0, 2), (2, 2)]
    assert [kv_head_shard(2, TPGroup(r, 4)) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        kv_head_shard(3, RANKS[0])
    with pytest.raises(ValueError, match="num_attention_heads"):
        QKVParallelLinear(8, 4, num_heads=3, num_kv_heads=1, tp=RANKS[0])


def test_gate_up_and_down_shards_tile_the_checkpoint() -> None:
    gate, up, down = rand(6, 4, seed=4), rand(6, 4, seed=5), rand(4, 6, seed=6)
    bias = rand(4, seed=7)
    for tp in RANKS:
        rows = slice(3 * tp.rank, 3 * tp.rank + 3)
        merged = MergedColumnParallelLinear(4, [6, 6], tp=tp)
        load(merged.weight, gate, 0)
        load(merged.weight, up, 1)
        torch.testing.assert_close(merged.weight.data, torch.cat([gate[rows], up[rows]]))
        row = RowParallelLinear(6, 4, bias=True, tp=tp)
        load(row.weight, down)
        load(row.bias, bias)
        torch.testing.assert_close(row.weight.data, down[:, rows])
        # The bias is added once, by rank 0, before the all-reduce sums the partial outputs.
        torch.testing.assert_close(row.bias.data, bias if tp.rank == 0 else torch.zeros(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        load(RowParallelLinear(6, 4, tp=RANKS[1]).weight, rand(4, 5, seed=8))


def test_vocab_shards_pad_the_last_rank() -> None:
    table = rand(5, 3, seed=9)  # V=5 over 2 ranks: 3 rows each, rank 1 holds 2 real + 1 pad
    for tp in RANKS:
        emb = VocabParallelEmbedding(5, 3, tp=tp)
        head = ParallelLMHead(5, 3, tp=tp)
        for layer in (emb, head):
            load(layer.weight, table)
            real = table[3 * tp.rank: 3 * tp.rank + 3]
            torch.testing.assert_close(layer.weight.data[: len(real)], real)
            assert layer.weight.shape == (3, 3) and not layer.weight.data[len(real):].any()
        assert ParallelLMHead(5, 3, tied_to=emb, tp=tp).weight is emb.weight


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-moe", "ep"])
def test_moe_slices_experts_or_owns_whole_ones(expert_parallel: bool) -> None:
    num_experts, hidden, inter = 4, 3, 6
    gate = [rand(inter, hidden, seed=10 + e) for e in range(num_experts)]
    up = [rand(inter, hidden, seed=20 + e) for e in range(num_experts)]
    down = [rand(hidden, inter, seed=30 + e) for e in range(num_experts)]
    for rank in range(2):
        tp = TPGroup(rank, 2, expert_parallel=expert_parallel)
        moe = FusedMoE(num_experts, 2, hidden, inter, renormalize=True, tp=tp,
                       expert_parallel=expert_parallel)
        for e in range(num_experts):  # every rank sees every checkpoint tensor
            load(moe.w13_weight, gate[e], (e, 0))
            load(moe.w13_weight, up[e], (e, 1))
            load(moe.w2_weight, down[e], (e, None))
        if expert_parallel:  # whole experts 2r, 2r+1
            mine = range(2 * rank, 2 * rank + 2)
            assert moe.w13_weight.shape == (2, 2 * inter, hidden)
            want13 = torch.stack([torch.cat([gate[e], up[e]]) for e in mine])
            want2 = torch.stack([down[e] for e in mine])
        else:  # every expert, half of its intermediate size
            cols = slice(3 * rank, 3 * rank + 3)
            assert moe.w13_weight.shape == (num_experts, inter, hidden)
            want13 = torch.stack([torch.cat([gate[e][cols], up[e][cols]])
                                  for e in range(num_experts)])
            want2 = torch.stack([down[e][:, cols] for e in range(num_experts)])
        torch.testing.assert_close(moe.w13_weight.data, want13, rtol=0, atol=0)
        torch.testing.assert_close(moe.w2_weight.data, want2, rtol=0, atol=0)
        # The loader still demands every expert of the checkpoint.
        assert len(moe.w13_weight.expected_shards) == 2 * num_experts
