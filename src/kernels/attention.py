"""Paged attention: KV store and attention over a block-paged KV cache.

Each operation has a Triton kernel (private `_name_kernel`), a public launcher that checks dtypes,
shapes and strides, and a plain-torch `*_ref`. References favour clarity over speed: they loop
over sequences on the host and compute in fp32, which makes them the definition of "correct" for
the kernels; tests compare the two.

Dimension legend:
    T  new (query) tokens in the step, all sequences concatenated
    B  sequences in the step
    Hq query heads, Hkv key/value heads (Hq is a multiple of Hkv: GQA), G = Hq // Hkv
    D  head dim
    S  context length of one sequence (cached tokens + new ones)
    N  num_blocks, P block_size (tokens per block)
    X  KV splits of the decode kernel (flash-decoding)

KV cache layout, one tensor per layer:

    kv_cache [2, N, P, Hkv, D]   index 0 = keys, 1 = values
    slot = block_id * P + offset -> flat row of kv_cache[i].view(N * P, Hkv, D)

FP8 KV cache (`kv_cache.dtype` float8_e4m3fn or float8_e5m2): the store divides K and V by their
per-tensor scales (k_scale, v_scale: fp32 host floats) and saturates to the format's range; the
attention kernels cast each loaded tile back to the query dtype and fold the scales in where they
cost nothing: k_scale into the softmax scale (q.(s k) = s (q.k)), v_scale into the final 1/l.

A sequence's context is the concatenation of its blocks in `block_tables[b]` order; its new tokens
are the LAST q_len positions of that context, and their K/V are stored before attention runs.

Attention kernels, picked on the host from `max_query_len` (an int, so no device sync):

    prefill   grid (T // BLOCK_Q + B, Hkv): every q tile of every sequence (found by binary
        search over query_start_loc), latest tiles first. A program owns BLOCK_M rows =
        BLOCK_M/G' query tokens x the G' (G rounded up to a power of two) query heads of one kv
        head, so every K/V tile is read once for the whole group and fed to tl.dot; online
        softmax in base 2; keys before the tile's first query skip the causal mask.
    decode    grid (B, Hkv, X), rows with q_len == 1 only. Split-KV (flash-decoding): program x
        attends to the x-th chunk of the context and writes a partial output + log-sum-exp; a
        reduce kernel (grid (B, Hq)) merges the X partials (skipped when X == 1). Chunk bounds
        come from seq_lens read on the device and X depends only on (B, Hkv), so a decode step
        can be captured in a CUDA graph; padded rows (q_len 0 or seq_len 0) write nothing.

    max_query_len <= 1: decode only. B == 1: prefill only. Otherwise (mixed batches, chunked
    prefill next to decodes) both run, the prefill kernel skipping q_len == 1 rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


class AttnTile(NamedTuple):
    """Launch constants of one attention kernel (see the module docstring for the row layout)."""

    block_m: int  # prefill: query rows (tokens x padded group heads) per program; decode: unused
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Keyed by (head_dim, dtype). bf16/fp16 at D=128 tuned on an H100 (docs/kernels.md); D=64 reuses
# those shapes untuned; fp32 is a correctness path; D 16/32 exist for tests.
PREFILL_TILES: dict[tuple[int, torch.dtype], AttnTile] = {
    **{(d, dt): AttnTile(16, 16, 2, 1) for d in (16, 32)
       for dt in (torch.float16, torch.bfloat16, torch.float32)},
    (64, torch.float16): AttnTile(64, 64, 4, 3),
    (64, torch.bfloat16): AttnTile(64, 64, 4, 3),
    (64, torch.float32): AttnTile(64, 32, 4, 2),
    (128, torch.float16): AttnTile(128, 128, 8, 3),
    (128, torch.bfloat16): AttnTile(128, 128, 8, 3),
    (128, torch.float32): AttnTile(32, 32, 4, 2),
}
DECODE_TILES: dict[tuple[int, torch.dtype], AttnTile] = {
    **{(d, dt): AttnTile(16, 16, 2, 1) for d in (16, 32)
       for dt in (torch.float16, torch.bfloat16, torch.float32)},
    (64, torch.float16): AttnTile(16, 64, 2, 4),
    (64, torch.bfloat16): AttnTile(16, 64, 2, 4),
    (64, torch.float32): AttnTile(16, 32, 4, 2),
    (128, torch.float16): AttnTile(16, 64, 2, 4),
    (128, torch.bfloat16): AttnTile(16, 64, 2, 4),
    (128, torch.float32): AttnTile(16, 32, 4, 2),
}
# Decode splits the KV of each (sequence, kv head) until about this many programs per SM exist.
DECODE_PROGRAMS_PER_SM = 4
MAX_DECODE_SPLITS = 64


FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale saturated to the range of `dtype` (an FP8 KV dtype), else a plain cast."""
    if dtype not in FP8_KV_DTYPES:
        return x.to(dtype)
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # CPU torch lacks index kernels for fp8: move FP8 bytes as uint8 (same size, same bits).
    return t.view(torch.uint8) if t.dtype in FP8_KV_DTYPES else t


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write key/value [T, Hkv, D] into kv_cache at slot_mapping [T]; slots < 0 are skipped.

    An FP8 cache stores key / k_scale and value / v_scale (saturated).
    """
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    assert key.shape == value.shape and key.shape[1:] == (num_kv_heads, head_dim)
    assert slot_mapping.shape == (key.shape[0],)
    # Padded tokens (e.g. CUDA-graph padding) carry slot -1 and must not touch the cache.
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = _bytes(kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim))
    flat[0].index_copy_(0, slots, _bytes(quantize_kv_ref(key[keep], k_scale, kv_cache.dtype)))
    flat[1].index_copy_(0, slots, _bytes(quantize_kv_ref(value[keep], v_scale, kv_cache.dtype)))


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float, k_scale: float = 1.0,
                        v_scale: float = 1.0, batch_invariant: bool = False) -> torch.Tensor:
    """Causal GQA attention of query [T, Hq, D] over each sequence's paged context -> [T, Hq, D].

    An FP8 cache is dequantized (times k_scale / v_scale) before attention, in fp32.
    batch_invariant: one query token at a time over exactly the keys it sees, so a token's result
    does not depend on how its sequence was chunked or batched.
    """
    fp8 = kv_cache.dtype in FP8_KV_DTYPES
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
        key = _bytes(kv_cache)[0, blocks].flatten(0, 1)[:seq_len]
        value = _bytes(kv_cache)[1, blocks].flatten(0, 1)[:seq_len]
        if fp8:
            key = key.view(kv_cache.dtype).float() * k_scale
            value = value.view(kv_cache.dtype).float() * v_scale
        if batch_invariant:
            for t in range(q_start, q_end):
                pos = seq_len - (q_end - t)  # this token's position; it sees keys 0 ..= pos
                out[t: t + 1] = causal_attention_ref(query[t: t + 1], key[: pos + 1],
                                                     value[: pos + 1], scale)
        else:
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


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, k_scale, v_scale, fp8_max,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     QUANT: tl.constexpr):
    # One program per token: its [Hkv, D] key and value rows go to one cache slot.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:  # padding token
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    ok = (heads < NUM_KV_HEADS)[:, None]
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + (heads * HEAD_DIM)[:, None] + dims[None, :]
    k = tl.load(key_ptr + tok * stride_kt + (heads * stride_kh)[:, None] + dims[None, :], mask=ok)
    v = tl.load(value_ptr + tok * stride_vt + (heads * stride_vh)[:, None] + dims[None, :], mask=ok)
    if QUANT:  # FP8 cache: divide by the per-tensor scale, saturate (the cast alone gives NaN)
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -fp8_max), fp8_max)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -fp8_max), fp8_max)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, end,
            qk_scale, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
            UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    # Online softmax of q [M, D] over keys start..end (paged), accumulating into acc [M, D].
    if INTERPRET:
        # The interpreter cannot take a tensor as a `range` bound (int() of a 1-element array
        # fails with numpy 2); the compiled path needs `range` so that loads get pipelined.
        n = start
        while n < end:
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr,
                                         table_ptr, kv_head, n, end, qk_scale, NUM_KV_HEADS,
                                         HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASK, UPCAST, DOT_PREC)
            n += BLOCK_N
    else:
        for n in range(start, end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr,
                                         table_ptr, kv_head, n, end, qk_scale, NUM_KV_HEADS,
                                         HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASK, UPCAST, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, n, end,
                 qk_scale, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # One BLOCK_N tile of keys n..n+BLOCK_N. MASK: 0 = all valid (caller guarantees),
    # 1 = keys < end, 2 = also causal (key <= q_pos). Scores are in base 2 (qk_scale holds
    # log2 e), so exp2 is one instruction.
    dims = tl.arange(0, HEAD_DIM)
    keys = n + tl.arange(0, BLOCK_N)
    key_ok = keys < end
    # Block-table entry of every key of the tile (a tile may span several pages).
    if MASK == 0:
        page = tl.load(table_ptr + keys // BLOCK_SIZE)
    else:
        page = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0)
    kv_off = ((page.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE) * NUM_KV_HEADS + kv_head)
    kv_off = kv_off * HEAD_DIM
    if MASK == 0:
        k = tl.load(k_cache_ptr + kv_off[None, :] + dims[:, None])  # [D, BLOCK_N]
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :])  # [BLOCK_N, D]
    else:
        k = tl.load(k_cache_ptr + kv_off[None, :] + dims[:, None], mask=key_ok[None, :],
                    other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=key_ok[:, None],
                    other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:  # an FP8 cache: the scales are folded in by the callers (module docstring)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PREC)  # [M, BLOCK_N], unscaled
    if MASK == 1:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    if MASK == 2:
        s = tl.where((keys[None, :] <= q_pos[:, None]) & key_ok[None, :], s, float("-inf"))
    # Every row sees >= 1 key in its first tile (callers order the ranges so), hence m_new is
    # finite and exp2 never sees (-inf) - (-inf).
    # m is kept scaled so that s * qk_scale - m is one FMA (qk_scale > 0 commutes with max).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _find_seq(qsl_ptr, num_seqs, global_tile, BLOCK_Q: tl.constexpr):
    # Binary search: the last sequence b with qsl[b] // BLOCK_Q + b <= global_tile.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= global_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, qsl_ptr, seq_lens_ptr, tables_ptr,
                    qk_scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    num_seqs,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                    INTERPRET: tl.constexpr, SKIP_DECODE: tl.constexpr):
    # Row r of the tile = query token tile*BLOCK_Q + r // GROUP_PAD, head kv_head*G + r % GROUP_PAD.
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    # Axis 0 enumerates the q tiles of all sequences: sequence b owns the global tiles from
    # qsl[b] // BLOCK_Q + b on (strictly increasing in b, never overlapping), so T // BLOCK_Q + B
    # programs cover every sequence whatever the mix of lengths. Reversed: a sequence's later
    # tiles see more keys (causal), so they start first and the tail is shorter.
    global_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(qsl_ptr, num_seqs, global_tile, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    tile = global_tile - (q_start // BLOCK_Q + seq)
    # Single-token rows go to the decode kernel instead when the launcher runs both.
    if (tile * BLOCK_Q >= q_len) | (SKIP_DECODE & (q_len == 1)):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    q_idx = tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_start + q_idx).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = seq_len - q_len + q_idx  # absolute position of each row's token
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys before the tile's first query position are visible to every row: no mask there.
    first_pos = seq_len - q_len + tile * BLOCK_Q
    full_end = first_pos // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    table_ptr = tables_ptr + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
                            0, full_end, qk_scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                            0, UPCAST, DOT_PREC, INTERPRET)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
                            full_end, kv_end, qk_scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                            BLOCK_N, 2, UPCAST, DOT_PREC, INTERPRET)
    out = acc * (v_scale / l_i)[:, None]
    o_off = (q_start + q_idx).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _split_bounds(seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Split x of a sequence covers keys [x*chunk, (x+1)*chunk) with chunk a multiple of BLOCK_N;
    # short contexts leave the last splits empty. Decode and reduce must agree on this.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return chunk, split * chunk


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   qsl_ptr, seq_lens_ptr, tables_ptr, qk_scale, v_scale,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                   INTERPRET: tl.constexpr):
    # Rows = the G query heads of one kv head (padded to BLOCK_M >= 16 for tl.dot); one token.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    chunk, start = _split_bounds(seq_len, split, NUM_SPLITS, BLOCK_N)
    # Only single-token rows: padded rows (q_len 0) and prefill rows of a mixed batch skip.
    if (q_len != 1) | (start >= seq_len):
        return
    end = tl.minimum(start + chunk, seq_len)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q_off = q_start.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_ptr = tables_ptr + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, rows, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
                            start, end, qk_scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                            1, UPCAST, DOT_PREC, INTERPRET)
    out = acc * (v_scale / l_i)[:, None]
    if NUM_SPLITS == 1:
        o_off = q_start.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        # Partials [B, Hq, X, D] and their base-2 log-sum-exp [B, Hq, X].
        part = (seq.to(tl.int64) * (GROUP * NUM_KV_HEADS) + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _decode_reduce_kernel(out_ptr, part_out_ptr, part_lse_ptr, qsl_ptr, seq_lens_ptr,
                          stride_ot, stride_oh, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    # Merge the non-empty splits of one (sequence, query head): weights exp2(lse_x - max lse).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    if (q_len != 1) | (seq_len == 0):
        return
    chunk, _ = _split_bounds(seq_len, 0, NUM_SPLITS, BLOCK_N)
    splits = tl.arange(0, NUM_SPLITS)
    ok = splits < tl.cdiv(seq_len, chunk)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                    other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    o_off = q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off + dims, out.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Triton `store_kv_ref`: key/value [T, Hkv, D] -> kv_cache at slot_mapping [T] (< 0: skip)."""
    num_tokens = key.shape[0]
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    assert kv_cache.is_contiguous() and kv_cache.shape[0] == 2
    assert key.shape == value.shape == (num_tokens, num_kv_heads, head_dim)
    quant = kv_cache.dtype in FP8_KV_DTYPES
    assert key.dtype == value.dtype and (quant or key.dtype == kv_cache.dtype), "KV dtypes"
    assert key.stride(2) == 1 and value.stride(2) == 1
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    assert key.device == value.device == kv_cache.device == slot_mapping.device
    _check_head_dim(head_dim)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache[0], kv_cache[1], slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), float(k_scale),
        float(v_scale), torch.finfo(kv_cache.dtype).max if quant else 0.0,
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, QUANT=quant, num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    max_query_len: int, out: torch.Tensor | None = None, *,
                    num_splits: int | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0, batch_invariant: bool = False) -> torch.Tensor:
    """Triton `paged_attention_ref` -> out [T, Hq, D]; rows of sequences with q_len 0 untouched.

    max_query_len (host int) picks the kernels (module docstring); num_splits overrides the
    decode split count (a power of two; tests), which otherwise depends only on (B, Hkv).
    batch_invariant: the prefill kernel alone serves every row (decode rows too), so a token's
    reduction order never depends on the batch (no batch-sized split-KV, no kernel switch).
    """
    _check_attention_args(query, kv_cache, query_start_loc, seq_lens, block_tables)
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(2) == 1
    num_seqs = seq_lens.shape[0]
    if query.shape[0] == 0 or num_seqs == 0:
        return out
    metadata = (query_start_loc, seq_lens, block_tables)
    scales = (scale * k_scale, v_scale)  # k_scale folds into the softmax scale
    # A mixed batch runs both kernels, each skipping the other's rows: decode rows inside the
    # prefill kernel would fill 1 token of a BLOCK_M tile and get no KV split.
    if batch_invariant:
        _launch_prefill(query, kv_cache, out, metadata, scales, skip_decode=False)
        return out
    mixed = max_query_len > 1 and num_seqs > 1
    if max_query_len > 1:
        _launch_prefill(query, kv_cache, out, metadata, scales, skip_decode=mixed)
    if max_query_len <= 1 or mixed:
        splits = num_splits or _decode_splits(num_seqs, kv_cache.shape[3], query.device)
        _launch_decode(query, kv_cache, out, metadata, scales, splits)
    return out


def _launch_prefill(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                    metadata: tuple[torch.Tensor, ...], scales: tuple[float, float],
                    skip_decode: bool) -> None:
    tile = PREFILL_TILES[(query.shape[2], query.dtype)]
    group = query.shape[1] // kv_cache.shape[3]
    group_pad = triton.next_power_of_2(group)
    block_m = max(tile.block_m, group_pad)
    num_seqs = metadata[1].shape[0]
    grid = (query.shape[0] // (block_m // group_pad) + num_seqs, kv_cache.shape[3])
    _prefill_kernel[grid](query, kv_cache[0], kv_cache[1], out, *metadata, num_seqs=num_seqs,
                          GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m,
                          SKIP_DECODE=skip_decode, **_launch_args(query, kv_cache, out, metadata,
                                                                  scales, tile))


def _launch_decode(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                   metadata: tuple[torch.Tensor, ...], scales: tuple[float, float],
                   splits: int) -> None:
    assert splits == triton.next_power_of_2(splits), splits
    tile = DECODE_TILES[(query.shape[2], query.dtype)]
    num_seqs, (_, num_heads, head_dim) = metadata[1].shape[0], query.shape
    if splits == 1:
        part_out = part_lse = out  # unused: the kernel writes `out` directly
    else:
        part_out = query.new_empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32)
        part_lse = query.new_empty((num_seqs, num_heads, splits), dtype=torch.float32)
    group = num_heads // kv_cache.shape[3]
    _decode_kernel[(num_seqs, kv_cache.shape[3], splits)](
        query, kv_cache[0], kv_cache[1], out, part_out, part_lse, *metadata,
        GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)), NUM_SPLITS=splits,
        **_launch_args(query, kv_cache, out, metadata, scales, tile))
    if splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, metadata[0], metadata[1], out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_N=tile.block_n, NUM_SPLITS=splits,
            num_warps=1 if head_dim <= 64 else 2)


def _launch_args(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                 metadata: tuple[torch.Tensor, ...], scales: tuple[float, float],
                 tile: AttnTile) -> dict:
    """Arguments shared by the prefill and decode kernels."""
    # CPU tensors only run under TRITON_INTERPRET=1; the interpreter computes garbage on bf16,
    # so upcast right after each load there.
    interpret = query.device.type == "cpu"
    upcast = interpret and query.dtype == torch.bfloat16
    return dict(
        qk_scale=scales[0] * _LOG2E, v_scale=scales[1], stride_qt=query.stride(0),
        stride_qh=query.stride(1),
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_bt=metadata[2].stride(0),
        NUM_KV_HEADS=kv_cache.shape[3], HEAD_DIM=query.shape[2], BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=tile.block_n, UPCAST=upcast, INTERPRET=interpret,
        DOT_PREC="ieee" if upcast or query.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages)


def _decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """KV splits so that B * Hkv * splits reaches DECODE_PROGRAMS_PER_SM programs per SM."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = triton.cdiv(DECODE_PROGRAMS_PER_SM * _SM_COUNT[index], num_seqs * num_kv_heads)
    return min(triton.next_power_of_2(wanted), MAX_DECODE_SPLITS)


def _check_head_dim(head_dim: int) -> None:
    assert head_dim >= 16 and head_dim == triton.next_power_of_2(head_dim), head_dim


def _check_attention_args(query: torch.Tensor, kv_cache: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          block_tables: torch.Tensor) -> None:
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = query.shape
    assert kv_cache.is_contiguous() and kv_cache.shape[0] == 2 and kv_cache.shape[4] == head_dim
    assert num_heads % kv_cache.shape[3] == 0
    assert query.dtype == kv_cache.dtype or kv_cache.dtype in FP8_KV_DTYPES, kv_cache.dtype
    assert query.stride(2) == 1
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32), query.dtype
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype == torch.int32
    assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2
    assert block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert query_start_loc.is_contiguous()
    devices = {t.device for t in (query, kv_cache, query_start_loc, seq_lens, block_tables)}
    assert len(devices) == 1, devices
    _check_head_dim(head_dim)
