"""Fused Gumbel-max sampling against its distribution and its reference."""

from __future__ import annotations

import pytest
import torch

from kernels.gumbel import gumbel_sample, gumbel_sample_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_argmax_and_draws_are_deterministic(device):
    torch.manual_seed(0)
    logits = torch.randn(4, 3000, device=device)
    temps = torch.tensor([0.0, 0.7, 0.0, 1.3], device=device)
    seeds = torch.tensor([1, 2, 3, 4], dtype=torch.int64, device=device)
    out = gumbel_sample(logits, temps, seeds)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert torch.equal(out, gumbel_sample(logits, temps, seeds))
    other = gumbel_sample(logits, temps, seeds + 100)
    assert torch.equal(other[[0, 2]], out[[0, 2]])
    assert torch.equal(gumbel_sample_ref(logits, temps, seeds)[[0, 2]], out[[0, 2]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", [gumbel_sample, gumbel_sample_ref])
def test_frequencies_follow_softmax_of_scaled_logits(device, sampler):
    # One row repeated with many seeds: empirical frequencies vs softmax(logits / T).
    v, n, t = 8, 800, 0.8
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], device=device)
    batch = logits.expand(n, v).contiguous()
    seeds = torch.arange(n, dtype=torch.int64, device=device) * 7919 + 3
    out = sampler(batch, torch.full((n,), t, device=device), seeds)
    freq = torch.bincount(out.cpu(), minlength=v).double() / n
    want = torch.softmax(logits.cpu().double() / t, dim=0)
    chi2 = (n * (freq - want) ** 2 / want).sum().item()
    assert chi2 < 24.3, (freq, want)  # chi-square, 7 dof, p = 0.001


def test_masked_entries_are_never_drawn():
    logits = torch.full((64, 100), float("-inf"))
    logits[:, [3, 50, 99]] = 0.0
    out = gumbel_sample(logits, torch.ones(64), torch.arange(64, dtype=torch.int64))
    assert set(out.tolist()) <= {3, 50, 99}
