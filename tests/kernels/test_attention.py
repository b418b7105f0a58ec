"""Triton attention kernels against their torch references (interpreter on CPU, compiled on CUDA).

Dimension legend: T tokens, B sequences, Hq/Hkv query/kv heads, D head dim, P block size.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.attention import paged_attention, paged_attention_ref, store_kv, store_kv_ref

BLOCK = 16
# CPU tensors run only in the Triton interpreter and CUDA tensors only compiled (conftest turns
# the interpreter on unless the GPU run sets TRITON_INTERPRET=0).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (
    ["cuda"] if torch.cuda.is_available() and not INTERPRET else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(not DEVICES, reason="needs the interpreter or a CUDA device")


def make_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: str, seed: int = 0, pad_tokens: int = 0):
    """(q_len, seq_len) per sequence -> query [T, Hq, D] and a random paged cache.

    Blocks are shuffled and non-contiguous; the cache is random everywhere (unused blocks and the
    padding block 0 included), so reading a wrong block changes the result. `pad_tokens` extra
    query rows belong to no sequence (CUDA-graph padding).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-s // BLOCK) for _, s in seqs]
    num_blocks = sum(blocks_needed) + 3
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    tables = torch.zeros(len(seqs), max(max(blocks_needed), 1), dtype=torch.int32)
    for b, n in enumerate(blocks_needed):
        tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    kv_cache = torch.randn(2, num_blocks, BLOCK, num_kv_heads, head_dim, generator=gen)
    num_tokens = sum(q for q, _ in seqs) + pad_tokens
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    qsl = torch.tensor([0] + [q for q, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32)
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                 for t in (query, kv_cache, qsl, seq_lens, tables))


def check_attention(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, dtype,
                    device: str, head_dim: int = 16, pad_tokens: int = 0,
                    num_splits: int | None = None, seed: int = 0) -> None:
    """Run the kernel into a NaN-poisoned `out`; every real token row must match the ref."""
    query, kv_cache, qsl, seq_lens, tables = make_batch(
        seqs, num_heads, num_kv_heads, head_dim, dtype, device, seed, pad_tokens)
    max_query_len = max(q for q, _ in seqs)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    paged_attention(query, kv_cache, qsl, seq_lens, tables, scale, max_query_len, out,
                    num_splits=num_splits)
    ref = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, scale)
    real = int(qsl[-1])
    tol = TOL[dtype]
    torch.testing.assert_close(out[:real].float(), ref[:real].float(), atol=tol, rtol=tol)
    # Padding rows belong to no sequence: never written.
    assert out[real:].isnan().all()


MIXED = [(5, 5), (1, 40), (11, 37), (0, 6), (1, 1), (16, 16)]  # prefill, decode, cached prefix,
# nothing new, 1-token prompt, block-aligned prefill


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,num_splits", [(1, None), (2, 4), (4, 2)])
def test_prefill_mixed_batch(device: str, dtype: torch.dtype, group: int,
                             num_splits: int | None) -> None:
    # Mixed batches run the prefill kernel and the split-KV decode kernel side by side.
    check_attention(MIXED, num_heads=2 * group, num_kv_heads=2, dtype=dtype, device=device,
                    num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_single_sequence(device: str) -> None:
    # B == 1 runs the prefill kernel alone: several query tiles over a cached prefix.
    check_attention([(40, 70)], num_heads=4, num_kv_heads=2, dtype=torch.float16, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_group_not_power_of_two(device: str) -> None:
    check_attention([(7, 20), (3, 3)], num_heads=6, num_kv_heads=2, dtype=torch.float32,
                    device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,num_splits", [(1, 4), (2, None), (4, 1), (4, 8)])
def test_decode_with_padded_rows(device: str, dtype: torch.dtype, group: int,
                                 num_splits: int | None) -> None:
    # Two trailing padded rows (q_len 0, seq_len 0) and two padded tokens, as a CUDA graph pads;
    # (0, 6) has context but nothing new: it must not write the token row its q_start points at.
    seqs = [(1, 50), (1, 1), (1, 16), (1, 33), (0, 6), (0, 0), (0, 0)]
    check_attention(seqs, num_heads=2 * group, num_kv_heads=2, dtype=dtype, device=device,
                    pad_tokens=2, num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_query_and_out(device: str) -> None:
    # q is a column slice of a fused qkv projection; out is a slice of a wider buffer.
    query, kv_cache, qsl, seq_lens, tables = make_batch(
        [(3, 9), (1, 20)], 4, 2, 16, torch.float32, device)
    qkv = torch.randn(query.shape[0], 8 * 16, device=device)
    qkv[:, :64] = query.flatten(1)
    q_view = qkv[:, :64].view(-1, 4, 16)
    wide = torch.full((query.shape[0], 2, 4, 16), float("nan"), device=device)
    out = wide[:, 1]
    ref = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, 0.25)
    for max_query_len in (3, 1):
        if max_query_len == 1:
            qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
            ref = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, 0.25)
        paged_attention(q_view, kv_cache, qsl, seq_lens, tables, 0.25, max_query_len, out)
        n = int(qsl[-1])
        torch.testing.assert_close(out[:n], ref[:n], atol=2e-5, rtol=2e-5)
    assert wide[:, 0].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_ref(device: str, dtype: torch.dtype) -> None:
    num_tokens, num_kv_heads, head_dim = 9, 2, 16
    gen = torch.Generator().manual_seed(3)
    # key/value are column slices of one [T, (4 + 2 + 2) * D] qkv buffer: row stride != Hkv * D.
    qkv = torch.randn(num_tokens, 8 * head_dim, generator=gen).to(device=device, dtype=dtype)
    key = qkv[:, 4 * head_dim:6 * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 6 * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(4 * BLOCK, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens
    slots = slots.to(device)
    cache = torch.randn(2, 4, BLOCK, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    expected = cache.clone()
    store_kv(key, value, cache, slots)
    store_kv_ref(key, value, expected, slots)
    assert torch.equal(cache, expected)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_llama_shapes(dtype: torch.dtype, head_dim: int) -> None:
    # Llama-8B-like heads (GQA 4) with long contexts: multi-tile prefill and split-KV decode.
    prefill = [(300, 1100), (517, 517), (1, 2049), (64, 64)]
    check_attention(prefill, 32, 8, dtype, "cuda", head_dim=head_dim, seed=1)
    decode = [(1, 3000), (1, 17), (1, 1024), (1, 4097), (0, 0)]
    for num_splits in (None, 1, 16):
        check_attention(decode, 32, 8, dtype, "cuda", head_dim=head_dim, pad_tokens=1,
                        num_splits=num_splits, seed=2)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="compiled CUDA only")
def test_cuda_graph_decode_replays_with_new_lengths() -> None:
    # Capture once at a padded batch of 4, then change seq_lens / tables / q in place: the grid
    # and every host-side value stay the same, so replays must follow the new device values.
    query, kv_cache, qsl, seq_lens, tables = make_batch(
        [(1, 700), (1, 40), (0, 0), (0, 0)], 32, 8, 128, torch.bfloat16, "cuda", seed=4,
        pad_tokens=2)
    out = torch.full_like(query, float("nan"))
    scale = 128**-0.5
    paged_attention(query, kv_cache, qsl, seq_lens, tables, scale, 1, out)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(query, kv_cache, qsl, seq_lens, tables, scale, 1, out)
    for lens in ([700, 40, 0, 0], [64, 690, 5, 0]):
        qsl.copy_(torch.tensor([0, 1, 2, 3 if lens[2] else 2, 3 if lens[2] else 2]))
        seq_lens.copy_(torch.tensor(lens))
        query.normal_()
        out.fill_(float("nan"))
        graph.replay()
        ref = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, scale)
        real = int(qsl[-1])
        torch.testing.assert_close(out[:real].float(), ref[:real].float(), atol=2e-2, rtol=2e-2)
        assert out[real:].isnan().all()
