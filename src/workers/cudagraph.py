"""`CudaGraphs`: steps replayed from captured CUDA graphs, one per batch-size bucket.

A step of small, fixed-shape queries launches the same kernels every time; at small batch their
launch overhead is most of the step. We capture the model's forward once per bucket size B (1, 2,
4, 8, then every 16 up to max_num_seqs) over persistent `InputBuffers`, and replay the smallest
bucket that holds the step, the extra rows and tokens padded (query length 0, no cache writes).
Attention kernels take their loop bounds from device tensors, so one graph serves every context
length.

Each set of graphs has a query length q: the bucket of size B holds up to B requests and B * q
tokens, each request at most q of them.
    q = 1       decode steps (the decode attention kernel alone)
    q = k + 1   speculative verify steps (each request's last token plus its k drafts) and a
                drafter's catch-up steps; captured with max_query_len q, so the prefill kernel
                (grid from the token count) runs beside the decode kernel and serves any mix
                of query lengths <= q.
A drafter head fed hidden states (EAGLE, MTP) passes a static `hidden` input buffer [tokens,
H_in] that the caller fills before each replay.
"""

from __future__ import annotations

import logging

import torch

from workers.attention import set_forward_context
from workers.inputs import InputBuffers

logger = logging.getLogger("workers")


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, buffers: InputBuffers, max_num_seqs: int,
                 query_len: int = 1, hidden: torch.Tensor | None = None):
        self.model = model
        self.buffers = buffers
        self.query_len = query_len
        self.hidden = hidden
        capacity = buffers.input_ids.shape[0]
        self.sizes = [s for s in capture_sizes(max_num_seqs) if s * query_len <= capacity]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # EAGLE-3 targets also leave auxiliary hidden states in `model.aux_hidden` each forward:
        # captured per bucket and set again on replay.
        self.aux_outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _call(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.hidden is None:
            return self.model(ids, pos)
        return self.model(ids, pos, self.hidden[: ids.shape[0]])

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every bucket, largest first so smaller ones reuse its pool memory; `pool`
        shares another set's memory (only one graph of the pool may be live at a time)."""
        buf = self.buffers
        num_cols = buf.block_tables_dev.shape[1]
        q = self.query_len
        for size in reversed(self.sizes):
            # Padding rows only: nothing is written to the cache during capture.
            buf.query_start_loc[: size + 1] = 0
            buf.copy_to_device(0, 0, 0, pad_reqs=size, pad_tokens=size * q)
            meta = buf.metadata(size * q, size, num_cols, max_query_len=q, max_seq_len=1)
            ids, pos = buf.input_ids_dev[: size * q], buf.positions_dev[: size * q]
            with set_forward_context(meta):
                self._call(ids, pos)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._call(ids, pos)
                if getattr(self.model, "aux_layers", ()):
                    self.aux_outputs[size] = self.model.aux_hidden
            pool = graph.pool()
            self.graphs[size] = graph
        self.pool = pool
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs (query length %d) for batch sizes %s", q, self.sizes)

    def bucket(self, num_reqs: int, num_tokens: int | None = None,
               max_query_len: int = 1) -> int | None:
        """The smallest captured size holding the step, or None (run it eagerly)."""
        if max_query_len > self.query_len:
            return None
        tokens = num_reqs if num_tokens is None else num_tokens
        for size in self.sizes:
            if size >= num_reqs and size * self.query_len >= tokens:
                return size
        return None

    def replay(self, num_reqs: int, num_cols: int, size: int,
               num_tokens: int | None = None) -> torch.Tensor:
        """Run a step whose inputs are staged in the host buffers (and `hidden`, if any)
        -> hidden [num_tokens, H].

        Only the block-table columns in use are copied; the graph reads the full-width buffer,
        but never past a row's seq_len.
        """
        tokens = num_reqs if num_tokens is None else num_tokens
        self.buffers.copy_to_device(tokens, num_reqs, num_cols, pad_reqs=size,
                                    pad_tokens=size * self.query_len)
        self.graphs[size].replay()
        if self.aux_outputs:
            self.model.aux_hidden = self.aux_outputs[size][:tokens]
        return self.outputs[size][:tokens]
