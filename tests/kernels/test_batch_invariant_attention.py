"""`paged_attention(batch_invariant=True)`: correct on mixed batches, and a sequence's rows are
bitwise the same alone and inside any batch (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch
from test_attention import DEVICES, MIXED, TOL, make_batch

from kernels.attention import paged_attention, paged_attention_ref

pytestmark = pytest.mark.skipif(not DEVICES, reason="needs the interpreter or a CUDA device")


def run(seqs, dtype, device, batch_invariant=True):
    query, kv_cache, qsl, seq_lens, tables = make_batch(seqs, 4, 2, 16, dtype, device)
    out = paged_attention(query, kv_cache, qsl, seq_lens, tables, 0.25,
                          max(q for q, _ in seqs), batch_invariant=batch_invariant)
    return out, (query, kv_cache, qsl, seq_lens, tables)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_on_a_mixed_batch(device, dtype):
    out, (query, kv_cache, qsl, seq_lens, tables) = run(MIXED, dtype, device)
    for invariant in (False, True):
        ref = paged_attention_ref(query, kv_cache, qsl, seq_lens, tables, 0.25,
                                  batch_invariant=invariant)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_do_not_depend_on_the_batch(device):
    # make_batch draws the cache randomly per batch: copy one sequence's inputs into another batch.
    alone_out, alone = run([(1, 40)], torch.float16, device)
    batch = [(5, 5), (1, 40), (11, 37)]
    _, (query, kv_cache, qsl, seq_lens, tables) = run(batch, torch.float16, device)
    q0, cache0, _, _, tables0 = alone
    row = int(qsl[1])
    query[row] = q0[0]
    n = -(-40 // 16)
    kv_cache[:, tables[1, :n].long()] = cache0[:, tables0[0, :n].long()]
    out = paged_attention(query, kv_cache, qsl, seq_lens, tables, 0.25, 11, batch_invariant=True)
    assert torch.equal(out[row], alone_out[0])
