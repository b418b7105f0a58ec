"""The `Attention` layer, its per-step metadata and the forward context that carries it.

The runner builds one `AttnMetadata` per step and enters `set_forward_context(meta)` around the
model call; every `Attention` layer reads it from there instead of having it threaded through
each module's forward. This is the codebase's one sanctioned global.

Dimension legend:
    T  new tokens in the step (all sequences concatenated), B sequences
    Hq query heads, Hkv key/value heads, D head dim
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import (
    paged_attention,
    paged_attention_ref,
    store_kv,
    store_kv_ref,
    varlen_attention_ref,
)


@dataclass
class AttnMetadata:
    """Where each new token goes in the paged KV cache and what it attends to (device tensors)."""

    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length after this step = computed + scheduled
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (-1: padding, skip)
    max_query_len: int
    max_seq_len: int


_forward_context: AttnMetadata | None = None


@contextmanager
def set_forward_context(meta: AttnMetadata) -> Iterator[None]:
    """Make `meta` visible to every `Attention` layer for the duration of one forward."""
    global _forward_context
    assert _forward_context is None, "forward contexts do not nest"
    _forward_context = meta
    try:
        yield
    finally:
        _forward_context = None


def get_forward_context() -> AttnMetadata:
    """The metadata of the forward pass in progress."""
    if _forward_context is None:
        raise RuntimeError("no forward context: run the model inside set_forward_context(meta)")
    return _forward_context


class Attention(nn.Module):
    """Paged causal attention for one decoder layer; q/k/v arrive already projected and rotated."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # [2, N, P, Hkv, D]; bound by the model's `bind_kv_cache`. Empty until then (memory
        # profiling runs the model before the cache exists).
        self.kv_cache = torch.empty(0)
        # `--batch-invariant`: one kernel (and reduction order) for every row, whatever the batch.
        self.batch_invariant = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]."""
        meta = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.kv_cache.numel() == 0:
            # No cache yet: every sequence is a fresh prefill of exactly its new tokens.
            out = varlen_attention_ref(q, k, v, meta.query_start_loc, self.scale)
        elif q.is_cuda:
            store_kv(k, v, self.kv_cache, meta.slot_mapping)
            out = paged_attention(q, self.kv_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, self.scale, meta.max_query_len,
                                  batch_invariant=self.batch_invariant)
        else:
            # CPU runs (tests, no GPU): the torch references, no Triton interpreter.
            store_kv_ref(k, v, self.kv_cache, meta.slot_mapping)
            out = paged_attention_ref(q, self.kv_cache, meta.query_start_loc, meta.seq_lens,
                                      meta.block_tables, self.scale,
                                      batch_invariant=self.batch_invariant)
        return out.view(num_tokens, self.num_heads * self.head_dim)
