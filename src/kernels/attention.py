"""Paged attention: KV store and attention over a block-paged KV cache.

For now this file holds the plain-torch references; the Triton kernels will join them here and be
tested against them. References favour clarity over speed: they loop over sequences on the host
and compute in fp32, which makes them the definition of "correct" for every later kernel.

Dimension legend:
    T  new (query) tokens in the step, all sequences concatenated
    B  sequences in the step
    Hq query heads, Hkv key/value heads (Hq is a multiple of Hkv: GQA)
    D  head dim
    S  context length of one sequence (cached tokens + new ones)
    N  num_blocks, P block_size (tokens per block)

KV cache layout, one tensor per layer:

    kv_cache [2, N, P, Hkv, D]   index 0 = keys, 1 = values
    slot = block_id * P + offset -> flat row of kv_cache[i].view(N * P, Hkv, D)

A sequence's context is the concatenation of its blocks in `block_tables[b]` order; its new tokens
are the LAST q_len positions of that context, and their K/V are stored before attention runs.
"""

from __future__ import annotations

import torch


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into kv_cache at slot_mapping [T]; slots < 0 are skipped."""
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    assert key.shape == value.shape and key.shape[1:] == (num_kv_heads, head_dim)
    assert slot_mapping.shape == (key.shape[0],)
    # Padded tokens (e.g. CUDA-graph padding) carry slot -1 and must not touch the cache.
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slots, key[keep].to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value[keep].to(kv_cache.dtype))


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention of query [T, Hq, D] over each sequence's paged context -> [T, Hq, D]."""
    block_size = kv_cache.shape[2]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[b, :num_blocks].long()
        # [n, P, Hkv, D] -> [S, Hkv, D]: the context in position order.
        key = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
        value = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
        out[q_start:q_end] = causal_attention_ref(query[q_start:q_end], key, value, scale)
    return out


def varlen_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of packed sequences with no cached prefix: q [T, Hq, D], k/v [T, Hkv, D]."""
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for q_start, q_end in zip(starts[:-1], starts[1:], strict=True):
        if q_end > q_start:
            sl = slice(q_start, q_end)
            out[sl] = causal_attention_ref(query[sl], key[sl], value[sl], scale)
    return out


def causal_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """One sequence: query [q, Hq, D] are the last q of S positions of key/value [S, Hkv, D]."""
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    assert num_heads % num_kv_heads == 0 and q_len <= seq_len
    group = num_heads // num_kv_heads
    # Query head h reads kv head h // group (the HF `repeat_kv` order).
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    q = query.float().transpose(0, 1)  # [Hq, q, D]
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [Hq, q, S]
    # Query i sits at position S - q + i and sees keys 0 ..= that position.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    k_pos = torch.arange(seq_len, device=query.device)
    scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1).to(query.dtype)  # [q, Hq, D]
