"""Rotary position embedding of q and k in one launch, neox (rotate-half) layout as HF Llama.

Each head vector x = (x1 | x2), halves of D/2, is rotated by the angles of its token's position:

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin

cos/sin come from fp32 tables [max_pos, D/2] (`workers.layers.RotaryEmbedding`), are rounded to
the activation dtype first, and every product and sum rounds to it too, exactly like HF's
`q * cos + rotate_half(q) * sin` in that dtype (and `rotary_embedding_ref`).

Grid (T, Q_TILES + K_TILES): program (t, j) rotates BLOCK_H heads of token t, of q when
j < Q_TILES, else of k. It depends on T and the head counts only (CUDA-graph safe); positions
are read on the device and must lie in [0, max_pos) (not checked: that would need a host sync).
q and k may be strided views (slices of the packed qkv output); in place, each program reads its
heads before writing them.

Dimension legend:
    T tokens, Hq query heads, Hkv key/value heads, D head dim (even), D/2 rotated pairs
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements (heads x padded D/2 pairs) one program rotates.
ROTARY_TILE_PAIRS = 1024
ROTARY_NUM_WARPS = 4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         cos_cache: torch.Tensor, sin_cache: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by the angles of positions [T] -> new (q, k)."""
    cos = cos_cache[positions].to(q.dtype)  # [T, D/2]
    sin = sin_cache[positions].to(q.dtype)
    cos = torch.cat((cos, cos), -1)[:, None]  # [T, 1, D], broadcast over heads
    sin = torch.cat((sin, sin), -1)[:, None]
    return _rotate_half_ref(q, cos, sin), _rotate_half_ref(k, cos, sin)


def _rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(src_ptr, dst_ptr, tok, head0, stride_st, stride_sh, stride_dt, stride_dh,
                  cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # Heads [head0, head0 + BLOCK_H) of one token; cos/sin [BLOCK_HALF] already rounded.
    heads = (head0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    mask = (heads < NUM_HEADS)[:, None] & (pairs < HALF)[None, :]
    src = src_ptr + tok * stride_st + (heads * stride_sh)[:, None] + pairs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = dst_ptr.dtype.element_ty
    # Round each product, then the sum, to the activation dtype: eager torch's order.
    x1c = (x1 * cos[None, :]).to(dtype).to(tl.float32)
    x2s = (x2 * sin[None, :]).to(dtype).to(tl.float32)
    x2c = (x2 * cos[None, :]).to(dtype).to(tl.float32)
    x1s = (x1 * sin[None, :]).to(dtype).to(tl.float32)
    dst = dst_ptr + tok * stride_dt + (heads * stride_dh)[:, None] + pairs[None, :]
    tl.store(dst, (x1c - x2s).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2c + x1s).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos,
                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_TILES: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    dtype = q_out_ptr.dtype.element_ty
    # The tables' `.to(activation dtype)` of the reference.
    cos = tl.load(cos_ptr + pos * stride_cos + pairs, mask=pairs < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + pairs, mask=pairs < HALF, other=0.0)
    cos = cos.to(tl.float32).to(dtype).to(tl.float32)
    sin = sin.to(tl.float32).to(dtype).to(tl.float32)
    if tile < Q_TILES:
        _rotate_heads(q_ptr, q_out_ptr, tok, tile * BLOCK_H, stride_qt, stride_qh, stride_qot,
                      stride_qoh, cos, sin, NUM_HEADS=NUM_Q_HEADS, HALF=HALF, BLOCK_H=BLOCK_H,
                      BLOCK_HALF=BLOCK_HALF)
    else:
        _rotate_heads(k_ptr, k_out_ptr, tok, (tile - Q_TILES) * BLOCK_H, stride_kt, stride_kh,
                      stride_kot, stride_koh, cos, sin, NUM_HEADS=NUM_KV_HEADS, HALF=HALF,
                      BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor, *,
                     inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `rotary_embedding_ref`; inplace=True overwrites and returns q and k themselves."""
    _check_rotary_args(q, k, positions, cos_cache, sin_cache)
    # Out of place: contiguous outputs (q/k are often strided slices of the qkv projection).
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q_out, k_out
    num_kv_heads, half = k.shape[1], head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(max(1, ROTARY_TILE_PAIRS // block_half),
                  triton.next_power_of_2(max(num_q_heads, num_kv_heads)))
    q_tiles = triton.cdiv(num_q_heads, block_h)
    grid = (num_tokens, q_tiles + triton.cdiv(num_kv_heads, block_h))
    _rotary_kernel[grid](
        q, k, q_out, k_out, positions, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, Q_TILES=q_tiles, HALF=half,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=ROTARY_NUM_WARPS)
    return q_out, k_out


def _check_rotary_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                       cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3, (q.shape, k.shape)
    num_tokens, _, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.dtype == k.dtype and q.dtype in _FLOAT_DTYPES, (q.dtype, k.dtype)
    assert q.stride(2) == 1 and k.stride(2) == 1, (q.stride(), k.stride())
    assert positions.shape == (num_tokens,) and positions.is_contiguous()
    assert positions.dtype in (torch.int32, torch.int64), positions.dtype
    assert cos_cache.dim() == 2 and cos_cache.shape[1] == head_dim // 2
    assert cos_cache.shape == sin_cache.shape and cos_cache.stride() == sin_cache.stride()
    assert cos_cache.stride(1) == 1 and cos_cache.dtype == sin_cache.dtype
    assert cos_cache.dtype in _FLOAT_DTYPES, cos_cache.dtype
    devices = {t.device for t in (q, k, positions, cos_cache, sin_cache)}
    assert len(devices) == 1, devices
