"""`CudaGraphs`: decode steps replayed from captured CUDA graphs, one per batch-size bucket.

A decode-only step (every request computes exactly one token) launches the same kernels every
time; at small batch their launch overhead is most of the step. We capture the model's forward
once per bucket size B (1, 2, 4, 8, then every 16 up to max_num_seqs) over the persistent
`InputBuffers`, sharing one memory pool, and replay the smallest bucket >= the batch with the
extra rows padded (query length 0, no cache writes). Attention kernels take their loop bounds from
device tensors, so one graph serves every context length.
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
    def __init__(self, model: torch.nn.Module, buffers: InputBuffers, max_num_seqs: int):
        self.model = model
        self.buffers = buffers
        self.sizes = capture_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # EAGLE-3 targets also leave auxiliary hidden states in `model.aux_hidden` each forward:
        # captured per bucket and set again on replay.
        self.aux_outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller ones reuse its pool memory."""
        buf = self.buffers
        num_cols = buf.block_tables_dev.shape[1]
        pool = None
        for size in reversed(self.sizes):
            # Padding rows only: nothing is written to the cache during capture.
            buf.query_start_loc[: size + 1] = 0
            buf.copy_to_device(0, 0, 0, pad_reqs=size)
            meta = buf.metadata(size, size, num_cols, max_query_len=1, max_seq_len=1)
            ids, pos = buf.input_ids_dev[:size], buf.positions_dev[:size]
            with set_forward_context(meta):
                self.model(ids, pos)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(ids, pos)
                if getattr(self.model, "aux_layers", ()):
                    self.aux_outputs[size] = self.model.aux_hidden
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def bucket(self, num_reqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_reqs:
                return size
        return None

    def replay(self, num_reqs: int, num_cols: int, size: int) -> torch.Tensor:
        """Run a decode step whose inputs are staged in the host buffers -> hidden [num_reqs, H].

        Only the block-table columns in use are copied; the graph reads the full-width buffer,
        but never past a row's seq_len.
        """
        self.buffers.copy_to_device(num_reqs, num_reqs, num_cols, pad_reqs=size)
        self.graphs[size].replay()
        if self.aux_outputs:
            self.model.aux_hidden = self.aux_outputs[size][:num_reqs]
        return self.outputs[size][:num_reqs]
