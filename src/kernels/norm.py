"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder.

One kernel normalises rows of the last dim. The numerics are those of Hugging Face transformers
(and `rms_norm_ref`), step for step, so that fp32 runs match it to rounding and half-precision
runs round where it rounds:

    s   = x + residual                  in the activation dtype (HF's `residual + hidden_states`)
    n   = s * rsqrt(mean(s^2) + eps)    in fp32, then rounded to the activation dtype
    out = weight * n                    in the promoted dtype of weight and activation

The kernel takes 2-D [T, N] activations and 3-D [T, H, N] views (per-head q/k norm of Qwen3,
applied to a slice of the packed qkv output, so the rows need not be contiguous). A program
normalises ROWS whole rows at once (several short head rows, or one long hidden-state row); the
grid depends on T * H only, so a launch can be captured in a CUDA graph.

Dimension legend:
    T tokens, H heads (1 for 2-D input), N normalised size (hidden size or head dim)
    R = T * H rows
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements (ROWS x padded N) one program holds; short rows are packed until a tile is this full.
# A power of two.
NORM_TILE_ELEMS = 2048
# Whole rows live in registers: beyond this, a looped two-pass kernel would be needed.
NORM_MAX_COLS = 32768
# Elements per thread the warp count aims at.
NORM_ELEMS_PER_THREAD = 16

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) [..., N], or with a residual: (norm(x + residual), x + residual)."""
    if residual is not None:
        # The add happens in the activation dtype, exactly like HF's `residual + hidden_states`.
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, x)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, num_rows, eps,
                     stride_xt, stride_xh, stride_rt, stride_rh,
                     NUM_HEADS: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
                     ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # Program p owns rows [p * ROWS, (p + 1) * ROWS); row r is (token r // H, head r % H).
    # Outputs are contiguous [R, N]; inputs are addressed through their strides.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < num_rows)[:, None] & col_ok[None, :]
    tok = (rows // NUM_HEADS).to(tl.int64)
    head = (rows % NUM_HEADS).to(tl.int64)
    out_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x_off = (tok * stride_xt + head * stride_xh)[:, None] + cols[None, :]
    # Upcast right after the load: bf16 arithmetic is wrong in the interpreter.
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_off = (tok * stride_rt + head * stride_rh)[:, None] + cols[None, :]
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        # One rounding to the activation dtype: the same value torch's half-precision add gives.
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + out_off, s, mask=mask)
        x = s.to(tl.float32)
    # Padded columns and rows hold 0, so they add nothing to the sum of squares.
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # [ROWS]
    normed = (x * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton `rms_norm_ref` on x [T, N] or [T, H, N] (last dim contiguous); fresh outputs."""
    assert x.dim() in (2, 3) and x.stride(-1) == 1, (x.shape, x.stride())
    assert x.dtype in _FLOAT_DTYPES and weight.dtype in _FLOAT_DTYPES, (x.dtype, weight.dtype)
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.is_contiguous() and weight.device == x.device
    assert n <= NORM_MAX_COLS, f"rows of {n} elements do not fit one program"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        assert residual.stride(-1) == 1 and residual.device == x.device
    # Outputs are contiguous [T, (H,) N]; the kernel writes row r at r * N.
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = None if residual is None else torch.empty_like(out, dtype=x.dtype)
    if x.numel() > 0:  # T = 0 launches nothing
        _launch(x, weight, eps, residual, out, new_residual)
    return out if new_residual is None else (out, new_residual)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
            out: torch.Tensor, new_residual: torch.Tensor | None) -> None:
    # 2-D input is one head per token: the head stride is never multiplied by a nonzero index.
    num_heads = x.shape[1] if x.dim() == 3 else 1
    num_rows = x.shape[0] * num_heads
    n = x.shape[-1]
    block_n = triton.next_power_of_2(n)
    rows = max(1, NORM_TILE_ELEMS // block_n)  # a power of two, as tl.arange needs
    num_warps = min(16, max(1, rows * block_n // (32 * NORM_ELEMS_PER_THREAD)))
    # Without a residual its pointers are never dereferenced (HAS_RESIDUAL=False): pass x / out.
    res = residual if residual is not None else x
    _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
        x, res, weight, out, new_residual if new_residual is not None else out, num_rows, eps,
        x.stride(0), x.stride(1) if x.dim() == 3 else 0,
        res.stride(0), res.stride(1) if res.dim() == 3 else 0,
        NUM_HEADS=num_heads, N=n, BLOCK_N=block_n, ROWS=rows,
        HAS_RESIDUAL=residual is not None, num_warps=num_warps)
