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


_KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                    "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache element type for `--kv-cache-dtype` ("auto": the model dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be auto, {', '.join(_KV_CACHE_DTYPES)}; "
                         f"got {kv_cache_dtype!r}")
    return _KV_CACHE_DTYPES[kv_cache_dtype]


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
        # Per-tensor scales of an FP8 cache (stored = real / scale); 1.0 unless the checkpoint
        # has k_scale / v_scale. Unused for a cache in the model dtype.
        self.k_scale = 1.0
        self.v_scale = 1.0

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
            store_kv(k, v, self.kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
            out = paged_attention(q, self.kv_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, self.scale, meta.max_query_len,
                                  k_scale=self.k_scale, v_scale=self.v_scale,
                                  batch_invariant=self.batch_invariant)
        else:
            # CPU runs (tests, no GPU): the torch references, no Triton interpreter.
            store_kv_ref(k, v, self.kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
            out = paged_attention_ref(q, self.kv_cache, meta.query_start_loc, meta.seq_lens,
                                      meta.block_tables, self.scale, self.k_scale, self.v_scale,
                                      batch_invariant=self.batch_invariant)
        return out.view(num_tokens, self.num_heads * self.head_dim)
