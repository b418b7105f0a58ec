"""The rejection sampler kernel against its torch reference, and its statistics.

Runs the Triton code under TRITON_INTERPRET=1 on CPU (tests/conftest.py) on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rejection import rejection_sample, rejection_sample_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(b: int, k: int, v: int, seed: int, with_q: bool, greedy_rows: list[bool]):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(b, k + 1, v, generator=gen) * 2, dim=-1)
    q = torch.softmax(torch.randn(b, k, v, generator=gen) * 2, dim=-1) if with_q else None
    if q is not None:
        drafts = torch.multinomial(q.reshape(b * k, v), 1, generator=gen).reshape(b, k)
    else:  # half the drafts are the target's argmax, so some rows accept several
        drafts = torch.randint(0, v, (b, k), generator=gen)
        top = p[:, :k].argmax(-1)
        drafts = torch.where(torch.rand(b, k, generator=gen) < 0.5, top, drafts)
    num_draft = torch.randint(0, k + 1, (b,), generator=gen)
    uniform = torch.rand(b, k, generator=gen)
    noise = torch.empty(b, v).exponential_(generator=gen)
    return (drafts, num_draft, p, q, p.argmax(-1), torch.tensor(greedy_rows), uniform, noise)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference(with_q, seed, device):
    # v not a multiple of the block: exercises the tail mask; on CUDA also a real vocab size.
    b, k, v = (6, 3, 50) if device == "cpu" else (6, 4, 128256)
    args = _inputs(b, k, v, seed, with_q, [False, True, False, False, True, False])
    args = tuple(a.to(device) if a is not None else None for a in args)
    out = rejection_sample(*args).cpu()
    ref = rejection_sample_ref(*args).cpu()
    assert torch.equal(out, ref), (out, ref)
    num_draft = args[1]
    for i in range(b):  # row layout: accepted drafts, one token, then -1 padding
        row = out[i].tolist()
        length = sum(t >= 0 for t in row)
        assert 1 <= length <= int(num_draft[i]) + 1
        assert all(t >= 0 for t in row[:length]) and all(t == -1 for t in row[length:])


def test_greedy_fast_path_accepts_matching_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3]])
    target_argmax = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [4, 2, 3, 0]])
    num_draft = torch.tensor([3, 3, 2])
    args = (drafts, num_draft, None, None, target_argmax, torch.ones(3, dtype=torch.bool),
            torch.zeros(3, 3), None)
    expect = [[5, 6, 7, 8], [5, 6, -1, -1], [4, -1, -1, -1]]
    assert rejection_sample(*args).tolist() == expect
    assert rejection_sample_ref(*args).tolist() == expect


@pytest.mark.parametrize("with_q", [False, True])
def test_first_token_keeps_target_distribution(with_q):
    # Many independent copies of one request: the first emitted token must follow p_0 whatever
    # the draft distribution. Chi-square against p_0; the threshold is far in the tail (p-value
    # ~1e-6 for 7 degrees of freedom), the seed is fixed, so the test is stable.
    v, k, n = 8, 2, 4000
    gen = torch.Generator().manual_seed(3)
    p_row = torch.softmax(torch.randn(k + 1, v, generator=gen), dim=-1)
    q_row = torch.softmax(torch.randn(k, v, generator=gen) * 2, dim=-1)
    p = p_row.expand(n, k + 1, v).contiguous()
    if with_q:
        q = q_row.expand(n, k, v).contiguous()
        drafts = torch.multinomial(q_row[0], n, replacement=True, generator=gen)
        drafts = torch.stack([drafts, drafts], dim=1)
    else:
        q = None
        drafts = torch.full((n, k), 3, dtype=torch.int64)
    args = (drafts, torch.full((n,), k), p, q, p.argmax(-1), torch.zeros(n, dtype=torch.bool),
            torch.rand(n, k, generator=gen), torch.empty(n, v).exponential_(generator=gen))
    first = rejection_sample_ref(*args)[:, 0]
    counts = torch.bincount(first, minlength=v).double()
    expected = p_row[0].double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0, (chi2, counts, expected)
