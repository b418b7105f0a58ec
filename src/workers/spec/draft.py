"""`DraftProposer`: k greedy draft tokens from a small model run beside the target.

Four drafters share this machinery: a draft model (`draft_model`: any supported checkpoint
with the target's vocabulary) and three heads fed the target's hidden states ("EAGLE" below):
EAGLE-1 (`workers.spec.eagle`), EAGLE-3 (`workers.spec.eagle3`: fed the target's auxiliary
hidden states, drafts over a smaller vocabulary mapped to target ids) and MTP
(`workers.spec.mtp`: the target checkpoint's own multi-token-prediction layer). Each keeps
its own KV cache, indexed by the target's block table: the scheduler allocates k lookahead
slots past the scheduled tokens for the drafter's writes, so the drafter's KV of position p
lives in the same slot as the target's.

The drafter follows the target step by step: for every request in a step it recomputes the
positions the target just computed (verified ones only) plus, for a request that sampled, the
new token(s), so its KV stays complete without ever re-reading a prompt. Positions it writes
past the verified tokens (its own drafts) are simply overwritten later.

    draft model: entry for position i = token_i;                         K/V of position i
    EAGLE:       entry for position i = (token_{i+1}, target hidden_i);  predicts token_{i+2}

Then, for each request that sampled (n known tokens), the last entry's logits give draft 1, and
k - 1 single-token forwards give the rest: the one for draft j feeds draft j - 1 at position
n + j - 2 (draft model) or n + j - 3 (EAGLE, with the head's own previous hidden state).
Drafts are greedy (argmax), so the rejection sampler treats them as one-hot.

Dimension legend: T entries in one drafter forward, B requests, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sampling.logits import to_device
from workers.attention import set_forward_context
from workers.block_table import BlockTable
from workers.cudagraph import CudaGraphs
from workers.inputs import InputBuffers


@dataclass
class _Batch:
    """One drafter forward: flat entries of several requests."""

    ids: list[int]
    positions: list[int]
    hidden_rows: list[int]  # EAGLE: row of the target (or own) hidden state feeding each entry
    rows: list[int]  # block-table row of each request
    query_lens: list[int]
    seq_lens: list[int]


class DraftProposer:
    def __init__(self, model: nn.Module, k: int, eagle: bool, block_table: BlockTable,
                 max_model_len: int, device: torch.device, dtype: torch.dtype, *,
                 max_num_seqs: int, max_tokens: int, target_width: int = 0) -> None:
        """`max_tokens`: the most entries of one forward (the target's step token budget);
        `target_width`: EAGLE heads, the width of the target hidden states they are fed."""
        self.model, self.k, self.eagle = model, k, eagle
        self.block_table = block_table
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.device, self.dtype = device, dtype
        self.block_size = block_table.block_size
        self.kv_caches: list[torch.Tensor] = []
        # Persistent inputs (the drafter's own: the runner's still hold the target's step) and,
        # for EAGLE heads, the hidden states fed to the catch-up forward (the target's) and to
        # the single-token forwards (the head's own), static for CUDA graphs.
        self.buffers = InputBuffers(max_tokens, max_num_seqs, block_table.table.shape[1], device)
        self.hidden_in: tuple[torch.Tensor, torch.Tensor] | None = None
        if eagle:
            self.hidden_in = (torch.zeros(max_tokens, target_width, dtype=dtype, device=device),
                              torch.zeros(max_num_seqs, model.args.hidden_size, dtype=dtype,
                                          device=device))
        # (catch-up graphs with query length k + 1, single-token graphs); empty: eager.
        self.graphs: list[CudaGraphs] = []

    def bytes_per_block(self) -> int:
        """KV bytes the drafter adds to each block."""
        elems = int(np.prod(self.model.kv_cache_shape(1, self.block_size)))
        return elems * torch.empty((), dtype=self.dtype).element_size() * self.model.num_layers

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the drafter's own cache with the target's block count."""
        shape = self.model.kv_cache_shape(num_blocks, self.block_size)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.model.num_layers)]
        self.model.bind_kv_cache(self.kv_caches)

    def capture_graphs(self) -> None:
        """Capture the catch-up and single-token forwards (CUDA, after `init_kv_cache`)."""
        hidden = self.hidden_in or (None, None)
        graphs = [CudaGraphs(self.model, self.buffers, self.max_num_seqs, self.k + 1, hidden[0]),
                  CudaGraphs(self.model, self.buffers, self.max_num_seqs, 1, hidden[1])]
        pool = None
        for g in graphs:  # the larger catch-up graphs first: one shared pool
            g.capture(pool)
            pool = g.pool
        self.graphs = graphs

    def propose(self, entries: list[tuple], hidden: torch.Tensor,
                sampled: dict[str, int]) -> dict[str, list[int]]:
        """Drafts for each request in `sampled` (req_id -> its number of known tokens n).

        `entries`: (state, start, num_scheduled, first flat row) of every request in the step
        that takes drafts; `hidden` [T, H] the target's hidden states of the step.
        """
        batch, last, limits = self._catch_up_batch(entries, sampled)
        if not batch.ids:
            return {}
        # [B, H]: each sampler's last entry; feeds EAGLE's next step.
        prev_hidden = self._run(batch, hidden).index_select(
            0, to_device(last, torch.int64, self.device))
        tokens = self._greedy(prev_hidden)
        order = [req_id for req_id in limits]  # requests that sampled, in entry order
        drafts = {req_id: [t] for req_id, t in zip(order, tokens, strict=True)}
        for j in range(2, self.k + 1):
            live = [i for i, req_id in enumerate(order) if limits[req_id][1] >= j]
            if not live:
                break
            pos = [limits[order[i]][0] + j - 2 - self.eagle for i in live]
            step = _Batch(ids=[drafts[order[i]][-1] for i in live], positions=pos,
                          hidden_rows=live, rows=[limits[order[i]][2] for i in live],
                          query_lens=[1] * len(live), seq_lens=[p + 1 for p in pos])
            out = self._run(step, prev_hidden, single=True)
            next_tokens = self._greedy(out)
            for i, t in zip(live, next_tokens, strict=True):
                drafts[order[i]].append(t)
            prev_hidden = prev_hidden.clone()
            prev_hidden[to_device(live, torch.int64, self.device)] = out
        return {req_id: d[: limits[req_id][1]] for req_id, d in drafts.items()}

    def _greedy(self, hidden: torch.Tensor) -> list[int]:
        """Argmax tokens (target vocabulary ids) of the drafter's output rows [N, H]."""
        ids = self.model.compute_logits(hidden).argmax(dim=-1)
        to_target = getattr(self.model, "to_target_ids", None)  # EAGLE-3's smaller vocabulary
        return (to_target(ids) if to_target is not None else ids).tolist()

    def _catch_up_batch(self, entries: list[tuple], sampled: dict[str, int]):
        """The first forward's entries; the flat index of each sampler's last entry; and per
        sampler (n, drafts it may take, block-table row)."""
        batch = _Batch([], [], [], [], [], [])
        last: list[int] = []
        limits: dict[str, tuple[int, int, int]] = {}
        shift = 1 if self.eagle else 0  # EAGLE's entry i needs token i + 1
        for state, start, num_scheduled, offset in entries:
            n = sampled.get(state.req_id)
            end = (n if n is not None else start + num_scheduled + shift) - shift
            if self.eagle:  # target hidden states exist for this step's positions only
                end = min(end, start + num_scheduled)
            capacity = int(self.block_table.num_blocks[state.row]) * self.block_size
            full = end <= capacity  # never write past the blocks the scheduler allocated
            end = min(end, capacity)
            if end <= start:
                if n is not None:  # pragma: no cover - the scheduler allocates these slots
                    raise AssertionError(f"no drafter entry for {state.req_id}")
                continue
            tokens = state.token_slice(start + shift, end + shift)
            batch.ids += tokens
            batch.positions += range(start, end)
            batch.hidden_rows += range(offset, offset + end - start)
            batch.rows.append(state.row)
            batch.query_lens.append(end - start)
            batch.seq_lens.append(end)
            if n is not None:
                last.append(len(batch.ids) - 1)
                # Draft j is at position n + j - 1; its forward writes position <= n + j - 2.
                k = max(0, min(self.k, self.max_model_len - n, capacity - n + 1)) if full else 0
                limits[state.req_id] = (n, k, state.row)
        # Requests whose limit is 0 still ran (their KV is needed later) but draft nothing.
        return batch, last, limits

    def _run(self, batch: _Batch, hidden: torch.Tensor, single: bool = False) -> torch.Tensor:
        """One drafter forward over `batch`; returns its output hidden states [T, H]. `single`:
        one entry per request (drafts 2..k), else the catch-up forward."""
        buf = self.buffers
        num_tokens, num_reqs = len(batch.ids), len(batch.rows)
        positions = np.asarray(batch.positions, dtype=np.int64)
        buf.input_ids[:num_tokens] = batch.ids
        buf.positions[:num_tokens] = positions
        rows = np.repeat(np.asarray(batch.rows, dtype=np.int64), batch.query_lens)
        buf.slot_mapping[:num_tokens] = self.block_table.slots(rows, positions)
        buf.query_start_loc[0] = 0
        buf.query_start_loc[1: num_reqs + 1] = np.cumsum(batch.query_lens)
        buf.seq_lens[:num_reqs] = batch.seq_lens
        max_seq_len, max_query_len = max(batch.seq_lens), max(batch.query_lens)
        cols = -(-max_seq_len // self.block_size)
        buf.block_tables[:num_reqs, :cols] = self.block_table.table[batch.rows, :cols]
        hidden_in = None
        if self.hidden_in is not None:
            hidden_in = self.hidden_in[int(single)][:num_tokens]
            torch.index_select(hidden, 0, to_device(batch.hidden_rows, torch.int64, self.device),
                               out=hidden_in)
        if self.graphs:
            graphs = self.graphs[int(single)]
            size = graphs.bucket(num_reqs, num_tokens, max_query_len)
            if size is not None:
                return graphs.replay(num_reqs, cols, size, num_tokens)
        buf.copy_to_device(num_tokens, num_reqs, cols)
        meta = buf.metadata(num_tokens, num_reqs, cols, max_query_len, max_seq_len)
        ids, pos = buf.input_ids_dev[:num_tokens], buf.positions_dev[:num_tokens]
        with set_forward_context(meta):
            return self.model(ids, pos) if hidden_in is None else self.model(ids, pos, hidden_in)
