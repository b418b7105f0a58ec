"""`BatchLogits`: the engine's batch-level logits processors over the persistent batch.

It owns one instance of every built-in batch-level processor (min_tokens, logit_bias, min_p) and
every custom one (loaded by FQCN or entry point), forwards each step's `BatchUpdate` to all of
them, and applies them to the rows that sample.

The sampler's logits hold only the N sampling rows; processors index rows by persistent-batch
index. `batch_rows[i]` is row i's index. When the N rows are exactly indices 0..B-1 in order
(steady decoding: the runner orders sampling rows by index) the logits are handed over as-is;
otherwise they are scattered into a [B, V] scratch tensor and gathered back afterwards.

Dimension legend: N sampling rows, B persistent-batch rows, V vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sampling.logits import BUILTIN_PROCESSORS, to_device
from sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext
from sampling.params import SamplingParams


class BatchLogits:
    """Built-in plus custom `LogitsProcessor` instances, split by argmax invariance."""

    def __init__(self, processors: Sequence[LogitsProcessor]) -> None:
        self.processors = list(processors)
        self.non_invariant = [p for p in self.processors if not p.is_argmax_invariant()]
        self.invariant = [p for p in self.processors if p.is_argmax_invariant()]
        self.batch_rows: list[int] | None = None  # this step's rows; None: 0..N-1
        self.batch_size = 0

    @classmethod
    def create(cls, context: ProcessorContext, device: torch.device,
               custom: Sequence[type[LogitsProcessor]] = ()) -> BatchLogits:
        """Instantiate the built-ins, then the custom classes, on `device`."""
        pin = device.type == "cuda"
        return cls([c(context, device, pin) for c in (*BUILTIN_PROCESSORS, *custom)])

    @classmethod
    def for_rows(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                 output_token_ids: list[list[int]], eos_token_ids: list[int], vocab_size: int,
                 device: torch.device) -> BatchLogits:
        """Built-ins over a one-off batch: row i added at index i."""
        context = ProcessorContext(vocab_size=vocab_size, eos_token_ids=tuple(eos_token_ids),
                                   max_num_seqs=len(params))
        batch = cls.create(context, device)
        batch.update_state(BatchUpdate(
            batch_size=len(params),
            added=[(i, p, prompt_token_ids[i], output_token_ids[i])
                   for i, p in enumerate(params)]))
        return batch

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Forward one step's update (None: the batch did not change) to every processor."""
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        for p in self.processors:
            p.update_state(batch_update)

    def set_step_rows(self, batch_rows: list[int]) -> None:
        """Persistent-batch index of each sampling row of this step (strictly increasing)."""
        full = len(batch_rows) == self.batch_size and (
            not batch_rows or batch_rows[-1] == len(batch_rows) - 1)
        self.batch_rows = None if full else batch_rows

    def apply(self, logits: Tensor, argmax_invariant: bool) -> None:
        """Run one group of processors on the sampling rows' `logits` [N, V], in place."""
        group = self.invariant if argmax_invariant else self.non_invariant
        # Idle built-ins are skipped (no scatter for nothing); custom processors always run.
        group = [p for p in group if getattr(p, "in_use", True)]
        if not group:
            return
        rows = self.batch_rows
        if rows is None:
            full = logits
        else:
            index = to_device(rows, torch.int64, logits.device)
            full = logits.new_zeros((self.batch_size, logits.shape[1]))
            full.index_copy_(0, index, logits)
        for p in group:
            full = p.apply(full)
        if rows is None:
            if full is not logits:
                logits.copy_(full)
        else:
            logits.copy_(full.index_select(0, index))
