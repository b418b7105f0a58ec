"""Grammar bitmask application: -inf on the logits of tokens a row's grammar forbids.

The bitmask is llguidance's layout: int32 words, bit `t % 32` of word `t // 32` set when token t
is allowed. Only constrained rows have a bitmask row; `rows` maps each to its logits row, so a
batch where few requests are constrained touches only their rows.

Dimension legend:
    N logits rows (sampling requests), V vocabulary size
    M constrained rows, W = ceil(V / 32) bitmask words per row
Tokens at or beyond 32 * W (a bitmask narrower than the vocab) count as forbidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vocab entries one program covers; a power of two, a multiple of 32.
BITMASK_BLOCK = 4096


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor) -> None:
    """In place: logits [N, V] rows `rows` [M] get -inf where bitmask [M, W] has a 0 bit."""
    num_vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [M, W, 32]
    allowed = bits.flatten(1)[:, :num_vocab].bool()  # [M, min(V, 32W)]
    if allowed.shape[1] < num_vocab:
        allowed = torch.nn.functional.pad(allowed, (0, num_vocab - allowed.shape[1]))
    rows = rows.to(torch.int64)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, num_vocab, num_words,
                                stride_logits, stride_bitmask, BLOCK: tl.constexpr):
    # Program (i, b): constrained row i, vocab entries [b * BLOCK, (b + 1) * BLOCK).
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < num_vocab
    word_idx = offs // 32
    words = tl.load(bitmask_ptr + i.to(tl.int64) * stride_bitmask + word_idx,
                    mask=in_vocab & (word_idx < num_words), other=0)
    allowed = (words >> (offs % 32)) & 1
    tl.store(logits_ptr + row * stride_logits + offs, float("-inf"),
             mask=in_vocab & (allowed == 0))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: -inf on logits [N, V] of rows `rows` [M] where bitmask [M, W] int32 is 0.

    Triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); else use the ref.
    """
    assert logits.dim() == 2 and bitmask.dim() == 2 and rows.dim() == 1, \
        (logits.shape, bitmask.shape, rows.shape)
    assert bitmask.dtype == torch.int32, bitmask.dtype
    assert bitmask.shape[0] == rows.shape[0], (bitmask.shape, rows.shape)
    assert logits.device == bitmask.device == rows.device
    if rows.numel() == 0:
        return
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1, (logits.stride(), bitmask.stride())
    num_vocab = logits.shape[1]
    grid = (rows.shape[0], triton.cdiv(num_vocab, BITMASK_BLOCK))
    _apply_token_bitmask_kernel[grid](logits, bitmask, rows, num_vocab, bitmask.shape[1],
                                      logits.stride(0), bitmask.stride(0), BLOCK=BITMASK_BLOCK)

