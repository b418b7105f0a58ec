"""SiLU-and-mul: the gated activation of a SwiGLU MLP over the packed (gate | up) projection.

    out = silu(gate) * up,   silu(g) = g / (1 + exp(-g))

The silu is computed in fp32 and rounded to the activation dtype before the multiply, which
rounds again: eager torch's `F.silu(gate) * up` in that dtype (and `silu_and_mul_ref`).

Grid (T, cdiv(I, ACT_BLOCK)): one program per token and column block; it depends on tensor
shapes only (CUDA-graph safe).

Dimension legend:
    T tokens, I intermediate size (x holds 2I columns: gate then up)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Columns of `out` one program writes.
ACT_BLOCK = 1024
ACT_NUM_WARPS = 4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] packed (gate | up) -> silu(gate) * up [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, size, stride_xt, BLOCK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    row = x_ptr + tok * stride_xt
    # Upcast right after the load: bf16 arithmetic is wrong in the interpreter.
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + size + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + tok * size + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton `silu_and_mul_ref`: x [T, 2I] (rows may be strided) -> contiguous [T, I]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.dtype in _FLOAT_DTYPES, x.dtype
    num_tokens, size = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, size), dtype=x.dtype, device=x.device)
    if out.numel() == 0:  # T = 0 launches nothing
        return out
    block = min(ACT_BLOCK, triton.next_power_of_2(size))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(size, block))](
        x, out, size, x.stride(0), BLOCK=block, num_warps=ACT_NUM_WARPS)
    return out
