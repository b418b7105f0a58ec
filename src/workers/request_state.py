"""`CachedRequestState` and `StepInputs`: the runner's per-request copy and one step's inputs.

The scheduler sends a request in full once (`NewReq`), then only deltas; the runner keeps the
rest here. `StepInputs` is what `ModelRunner._prepare_inputs` derives from one `ExecuteStep` for
the forward, the sampler and the drafter.

Dimension legend: T = tokens scheduled this step (all requests, flattened), H = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from enginecore.protocol import LoRARef, MMInput
from sampling.params import SamplingParams
from sampling.structured import RequestGrammar


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    num_computed_tokens: int
    row: int  # this request's row in the runner's BlockTable
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: RequestGrammar | None = None  # structured outputs: this request's matcher
    mm_inputs: list[MMInput] | None = None  # multimodal items, prompt order
    mrope: np.ndarray | None = None  # M-RoPE prompt positions [3, P] (None: text only)
    mrope_delta: int = 0  # generated token i sits at position i + mrope_delta
    lora: LoRARef | None = None  # the request's LoRA adapter (None: the base model)
    prompt_embeds: torch.Tensor | None = None  # [L, H]: decoder inputs of prompt positions < L
    # Speculative decoding: the drafts this step verifies (they follow the known tokens).
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (+ this step's drafts), without concatenating
        the lists."""
        known = self.num_tokens
        if end > known:
            drafts = self.spec_token_ids[max(start, known) - known: end - known]
            return (self.token_slice(start, known) if start < known else []) + drafts
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p: end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


@dataclass
class StepInputs:
    num_tokens: int  # T
    num_reqs: int  # B
    num_cols: int  # block-table columns in use
    max_query_len: int
    max_seq_len: int
    sample_rows: list[int]  # for each sampling request, its last token's index in [0, T)
    sample_reqs: list[CachedRequestState]
    # Prompt-logprob requests: (state, first token index in T, first position, count of rows)
    prompt_lp: list[tuple[CachedRequestState, int, int, int]]
    # Multimodal: positions [3, T] when some token's axes differ, placeholder embeddings.
    mrope: np.ndarray | None = None
    mm_embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # requests whose LoRA adapter failed
    # Prompt-embedding rows: (first token index in T, rows [n, H]) replacing the embedded ids
    embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # Speculative decoding: (state, num_computed before the step, num scheduled, first index in
    # T) of every request in the step, for the drafter.
    entries: list[tuple[CachedRequestState, int, int, int]] = field(default_factory=list)
