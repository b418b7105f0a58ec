"""The paged-attention references against a naive dense causal attention."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import paged_attention_ref, store_kv_ref, varlen_attention_ref

HQ, HKV, D, BLOCK = 4, 2, 8, 4


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                    ) -> torch.Tensor:
    """q [q, Hq, D] = last q positions of k/v [S, Hkv, D]; explicit per-head loops, fp64."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    out = torch.empty(q_len, num_heads, q.shape[2], dtype=torch.float64)
    for h in range(num_heads):
        kv = h // (num_heads // num_kv_heads)
        scores = (q[:, h].double() @ k[:, kv].double().T) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, kv].double()
    return out


def paged_batch(seqs: list[tuple[int, int]], num_blocks: int, seed: int = 0):
    """Random K/V contexts stored at shuffled blocks; returns everything the ref needs."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(1, num_blocks))  # block 0 stays unused: tables are padded with it
    random.Random(seed).shuffle(ids)
    kv_cache = torch.zeros(2, num_blocks, BLOCK, HKV, D)
    max_blocks = max(-(-s // BLOCK) for _, s in seqs)
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    queries, contexts, qsl = [], [], [0]
    for b, (q_len, seq_len) in enumerate(seqs):
        table = [ids.pop() for _ in range(-(-seq_len // BLOCK))]
        block_tables[b, :len(table)] = torch.tensor(table)
        k, v = torch.randn(2, seq_len, HKV, D, generator=gen)
        slots = torch.tensor([table[i // BLOCK] * BLOCK + i % BLOCK for i in range(seq_len)])
        store_kv_ref(k, v, kv_cache, slots)
        queries.append(torch.randn(q_len, HQ, D, generator=gen))
        contexts.append((k, v))
        qsl.append(qsl[-1] + q_len)
    return (torch.cat(queries), kv_cache, torch.tensor(qsl, dtype=torch.int32),
            torch.tensor([s for _, s in seqs], dtype=torch.int32), block_tables, contexts)


@pytest.mark.parametrize("seqs", [
    [(7, 7)],  # one prefill
    [(5, 5), (1, 9), (3, 11), (1, 1)],  # prefill, decode, chunk with cached prefix, 1-token prompt
    [(1, 4), (0, 6), (2, 16)],  # a sequence with nothing new, block-aligned lengths
])
def test_paged_attention_matches_dense(seqs: list[tuple[int, int]]) -> None:
    query, kv_cache, qsl, seq_lens, tables, contexts = paged_batch(seqs, num_blocks=24)
    scale = D**-0.5
    out = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    for b, (k, v) in enumerate(contexts):
        sl = slice(int(qsl[b]), int(qsl[b + 1]))
        torch.testing.assert_close(out[sl].double(), naive_attention(query[sl], k, v, scale),
                                   atol=1e-5, rtol=1e-5)


def test_paged_attention_bf16_close_to_fp32() -> None:
    query, kv_cache, qsl, seq_lens, tables, _ = paged_batch([(3, 10), (1, 6)], num_blocks=8)
    ref = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, 0.3)
    out = paged_attention_ref(query.bfloat16(), kv_cache.bfloat16(), qsl, seq_lens, tables, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_varlen_attention_matches_dense() -> None:
    gen = torch.Generator().manual_seed(1)
    lens = [4, 1, 6]
    q = torch.randn(sum(lens), HQ, D, generator=gen)
    k, v = torch.randn(2, sum(lens), HKV, D, generator=gen)
    qsl = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    out = varlen_attention_ref(q, k, v, qsl, 0.5)
    for start, end in zip(qsl[:-1].tolist(), qsl[1:].tolist(), strict=True):
        sl = slice(start, end)
        torch.testing.assert_close(out[sl].double(), naive_attention(q[sl], k[sl], v[sl], 0.5),
                                   atol=1e-5, rtol=1e-5)


def test_store_kv_writes_slots_and_skips_negative() -> None:
    kv_cache = torch.zeros(2, 3, BLOCK, HKV, D)
    key, value = torch.randn(2, 3, HKV, D)
    slots = torch.tensor([2 * BLOCK + 1, -1, 0 * BLOCK + 3])
    store_kv_ref(key, value, kv_cache, slots)
    assert torch.equal(kv_cache[0, 2, 1], key[0]) and torch.equal(kv_cache[1, 2, 1], value[0])
    assert torch.equal(kv_cache[0, 0, 3], key[2]) and torch.equal(kv_cache[1, 0, 3], value[2])
    # Exactly the two written rows (of K and of V) are non-zero: the -1 slot wrote nothing.
    assert int((kv_cache.abs().sum(dim=(-1, -2)) != 0).sum()) == 4
