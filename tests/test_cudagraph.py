"""`CudaGraphs`: bucket choice (CPU) and replays against the eager forward (GPU).

A graph set of query length q serves steps of at most `size` requests, `size * q` tokens and
q tokens per request; the speculative verify set (q = k + 1) must give the same hidden states
as the eager forward for any mix of query lengths up to q, padded rows included.
"""

from __future__ import annotations

import pytest
import torch

from workers.attention import set_forward_context
from workers.cudagraph import CudaGraphs, capture_sizes
from workers.inputs import InputBuffers
from workers.models import load_model


def test_bucket_holds_requests_and_tokens():
    buf = InputBuffers(64, 32, 4, torch.device("cpu"))
    decode = CudaGraphs(None, buf, 32)
    assert decode.sizes == capture_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert decode.bucket(3) == 4
    assert decode.bucket(3, 3, max_query_len=2) is None  # decode graphs: one token per request
    verify = CudaGraphs(None, buf, 32, query_len=5)
    assert verify.sizes == [1, 2, 4, 8]  # 16 * 5 tokens exceed the 64-token buffers
    assert verify.bucket(1, 5, max_query_len=5) == 1
    assert verify.bucket(2, 6, max_query_len=5) == 2
    assert verify.bucket(2, 11, max_query_len=5) == 4  # tokens, not requests, pick the bucket
    assert verify.bucket(1, 6, max_query_len=6) is None
    assert verify.bucket(9, 9, max_query_len=1) is None


def _stage(buf: InputBuffers, query_lens: list[int], seq_lens: list[int], block: int) -> int:
    """Stage a step of len(query_lens) requests (two blocks each, rows 2r+1, 2r+2)."""
    ids, pos, slots = [], [], []
    for r, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        buf.block_tables[r, :2] = [2 * r + 1, 2 * r + 2]
        for p in range(s - q, s):
            ids.append(7 * r + p + 1)
            pos.append(p)
            slots.append(int(buf.block_tables[r, p // block]) * block + p % block)
    n = len(ids)
    buf.input_ids[:n], buf.positions[:n], buf.slot_mapping[:n] = ids, pos, slots
    buf.query_start_loc[0] = 0
    buf.query_start_loc[1: len(query_lens) + 1] = torch.tensor(query_lens).cumsum(0).numpy()
    buf.seq_lens[: len(seq_lens)] = seq_lens
    return n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("query_lens", [[4], [1], [4, 1, 3], [2, 2, 2, 2, 2]],
                         ids=["one-full", "one-decode", "mixed", "five"])
def test_gpu_verify_graph_matches_eager(tiny_models, query_lens):
    dev = torch.device("cuda")
    model = load_model(tiny_models["llama"], torch.float32, dev)
    block = 16
    shape = model.kv_cache_shape(16, block)
    gen = torch.Generator(device=dev).manual_seed(0)
    caches = [torch.randn(shape, device=dev, generator=gen) for _ in range(model.num_layers)]
    model.bind_kv_cache(caches)
    buf = InputBuffers(64, 8, 4, dev)
    graphs = CudaGraphs(model, buf, 8, query_len=4)
    graphs.capture()
    seq_lens = [5 + 6 * r for r in range(len(query_lens))]
    n = _stage(buf, query_lens, seq_lens, block)
    b = len(query_lens)
    size = graphs.bucket(b, n, max(query_lens))
    assert size is not None
    hidden = graphs.replay(b, 2, size, n).clone()
    graph_caches = [c.clone() for c in caches]
    buf.copy_to_device(n, b, 2)
    meta = buf.metadata(n, b, 2, max(query_lens), max(seq_lens))
    with torch.inference_mode(), set_forward_context(meta):
        eager = model(buf.input_ids_dev[:n], buf.positions_dev[:n])
    torch.testing.assert_close(hidden, eager)
    for got, want in zip(graph_caches, caches, strict=True):  # the same K/V slots written
        torch.testing.assert_close(got, want)
