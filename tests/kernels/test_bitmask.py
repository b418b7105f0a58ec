"""The grammar-bitmask Triton kernel against its torch reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.sample import apply_token_bitmask, apply_token_bitmask_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("num_vocab, num_words, rows", [
    (100, 4, [0, 2]),  # V not a multiple of 32, exact width
    (70, 2, [1]),  # bitmask narrower than V: the tail is forbidden
    (4100, 129, [3, 0, 1]),  # two vocab blocks per row
    (64, 2, []),  # nothing constrained
])
def test_kernel_matches_ref(num_vocab, num_words, rows):
    gen = torch.Generator().manual_seed(num_vocab)
    logits = torch.randn(4, num_vocab, generator=gen).to(DEVICE)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), num_words), dtype=torch.int32,
                            generator=gen).to(DEVICE)
    if rows:
        bitmask[0, 0] = -1  # an all-allowed word and an all-forbidden one
        bitmask[-1, -1] = 0
    idx = torch.tensor(rows, dtype=torch.int64, device=DEVICE)
    want, got = logits.clone(), logits.clone()
    apply_token_bitmask_ref(want, bitmask, idx)
    apply_token_bitmask(got, bitmask, idx)
    assert torch.equal(got, want)
    untouched = [r for r in range(4) if r not in rows]
    assert torch.equal(got[untouched], logits[untouched])
    if rows:
        assert torch.isinf(got[rows[-1], 32 * (num_words - 1): 32 * num_words]).all()


def test_launcher_rejects_bad_inputs():
    logits = torch.zeros(2, 64, device=DEVICE)
    with pytest.raises(AssertionError):
        apply_token_bitmask(logits, torch.zeros(1, 2, dtype=torch.int64, device=DEVICE),
                            torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(AssertionError):
        apply_token_bitmask(logits, torch.zeros(2, 2, dtype=torch.int32, device=DEVICE),
                            torch.zeros(1, dtype=torch.int64, device=DEVICE))
