"""Fused temperature + Gumbel-max sampling: one read of the logits per row, no softmax.

argmax_v(logits[v] / T + g_v) with g_v ~ Gumbel(0, 1) draws v with probability softmax(logits / T)
(the Gumbel-max trick). The unfused torch path needs ~8 full passes over an [N, V] fp32 tensor
(scale, softmax, noise, clamp, divide, argmax...); at N=256, V=152k that is ~1.5 ms per step on an
H100, against ~0.05 ms for the single pass here.

Noise comes from Philox (`tl.rand`) keyed by a per-row seed, so a row's draw depends only on its
seed: the runner derives seeded rows' seeds from (request seed, output position) and unseeded
rows' from a per-step random seed. Rows with temperature 0 take the plain argmax.

Dimension legend: N rows, V vocabulary size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_V = 2048


@triton.jit
def _gumbel_kernel(logits_ptr, stride, temperature_ptr, seeds_ptr, out_ptr, V: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    greedy = temperature == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temperature))
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(logits_ptr + row * stride + offs, mask=mask,
                    other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, offs)  # uniform in [0, 1)
        u = tl.maximum(u, 1e-20)  # log(0) guard; the chance of 0 is ~2^-32 per draw
        g = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x * inv_t + g)
        score = tl.where(mask, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, offs, best_idx)
    # Lane maxima -> row maximum; ties resolved to the lowest index like torch.argmax.
    top = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == top, best_idx, V), axis=0)
    tl.store(out_ptr + row, idx.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor,
                  seeds: torch.Tensor) -> torch.Tensor:
    """Sampled ids [N] int64 from logits [N, V]; temperature [N] fp32 (0 = greedy), seeds [N]."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [N, V], row-contiguous"
    n, v = logits.shape
    assert temperature.shape == (n,) and temperature.dtype == torch.float32
    assert seeds.shape == (n,) and seeds.dtype == torch.int64
    assert logits.device == temperature.device == seeds.device
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n:
        _gumbel_kernel[(n,)](logits, logits.stride(0), temperature, seeds, out, v,
                             BLOCK_V=_BLOCK_V)
    return out


def gumbel_sample_ref(logits: torch.Tensor, temperature: torch.Tensor,
                      seeds: torch.Tensor) -> torch.Tensor:
    """The same distribution in plain torch (a different random stream than Philox's)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for i, (t, s) in enumerate(zip(temperature.tolist(), seeds.tolist(), strict=True)):
        row = logits[i].float()
        if t == 0.0:
            out[i] = row.argmax()
            continue
        gen = torch.Generator(device=logits.device).manual_seed(s)
        u = torch.rand(row.shape, generator=gen, device=row.device).clamp_min(1e-20)
        out[i] = (row / t - torch.log(-torch.log(u))).argmax()
    return out
