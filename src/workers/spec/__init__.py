"""Speculative decoding in the workers: `SpecDecoder` proposes drafts after each step.

    method        drafter                                   file
    ngram         prompt lookup over prompt + output        workers/spec/ngram.py
    draft_model   a small model with the target's vocab     workers/spec/draft.py
    eagle         an EAGLE-1 head on the target's hidden    workers/spec/eagle.py + draft.py
    eagle3        an EAGLE-3 head on 3 target layers' aux   workers/spec/eagle3.py + draft.py
    mtp           the target checkpoint's own MTP layer     workers/spec/mtp.py + draft.py

Verification of the drafts a step carries happens in the runner's sampling
(`sampling.rejection.verify_drafts`); see docs/spec_decode.md for the whole flow.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from enginecore.config import EngineConfig
from sampling.rejection import spec_eligible
from workers.block_table import BlockTable
from workers.models import load_model
from workers.spec.draft import DraftProposer
from workers.spec.eagle import load_eagle
from workers.spec.eagle3 import load_eagle3
from workers.spec.mtp import load_mtp
from workers.spec.ngram import NgramProposer


class SpecDecoder:
    """Proposes each sampling request's drafts for its next step (none when ineligible)."""

    def __init__(self, config: EngineConfig, target: nn.Module, block_table: BlockTable,
                 device: torch.device, dtype: torch.dtype) -> None:
        spec = config.speculative
        self.k = spec.num_speculative_tokens
        self.max_model_len = config.model.max_model_len
        self.ngram: NgramProposer | None = None
        self.drafter: DraftProposer | None = None
        if spec.method == "ngram":
            self.ngram = NgramProposer(self.k, spec.prompt_lookup_min, spec.prompt_lookup_max)
        elif spec.method in ("draft_model", "eagle", "eagle3", "mtp"):
            eagle = spec.method != "draft_model"  # a head fed the target's hidden states
            model = self._load(spec.method, spec.model or config.model.model, config, target,
                               dtype, device)
            if getattr(model, "args", None) is not None and \
                    model.args.vocab_size != config.model.vocab_size:
                raise ValueError(f"speculative_config.model {spec.model!r} has vocab size "
                                 f"{model.args.vocab_size}, the target "
                                 f"{config.model.vocab_size}: drafts need the same vocabulary")
            # EAGLE-3 heads read the target's auxiliary hidden states (several layers' worth).
            width = target.args.hidden_size * max(1, len(getattr(target, "aux_layers", ())))
            sched = config.scheduler
            self.drafter = DraftProposer(
                model, self.k, eagle, block_table, config.model.max_model_len, device, dtype,
                max_num_seqs=sched.max_num_seqs,
                # A catch-up forward adds each sampler's new token to the step's tokens.
                max_tokens=sched.max_num_batched_tokens + sched.max_num_seqs,
                target_width=width)
        else:  # config validation refuses the rest first
            raise NotImplementedError(f"speculative method {spec.method!r}")
        # EAGLE-3 reads the target's auxiliary hidden states (`aux_hidden`, set by each forward)
        # instead of its final hidden states.
        self.target = target if spec.method == "eagle3" else None

    @staticmethod
    def _load(method: str, path: str, config: EngineConfig, target: nn.Module,
              dtype: torch.dtype, device: torch.device) -> nn.Module:
        if method == "eagle":
            return load_eagle(path, target, dtype, device)
        if method == "eagle3":
            return load_eagle3(path, target, dtype, device)
        if method == "mtp":  # the MTP layers ship in the target's own checkpoint
            return load_mtp(config.model.model, target, dtype, device)
        return load_model(path, dtype, device, config.model.load_format)

    def bytes_per_block(self) -> int:
        """KV bytes per block the drafter adds (0 for n-gram)."""
        return self.drafter.bytes_per_block() if self.drafter is not None else 0

    def init_kv_cache(self, num_blocks: int) -> None:
        if self.drafter is not None:
            self.drafter.init_kv_cache(num_blocks)

    def capture_graphs(self) -> None:
        """CUDA graphs for the drafter's forwards (none for n-gram)."""
        if self.drafter is not None:
            self.drafter.capture_graphs()

    def drop_graphs(self) -> None:
        if self.drafter is not None:
            self.drafter.graphs = []

    def propose(self, entries: list[tuple], hidden: torch.Tensor,
                sampled: list) -> list[list[int]]:
        """Drafts for each state in `sampled` (aligned); `entries` as DraftProposer.propose."""
        eligible = {s.req_id: s.num_tokens for s in sampled if _eligible(s)}
        if self.ngram is not None:
            drafts = {}
            for s in sampled:
                if s.req_id in eligible:
                    room = min(self.k, self.max_model_len - s.num_tokens)
                    tokens = np.asarray(s.prompt_token_ids + s.output_token_ids, dtype=np.int64)
                    drafts[s.req_id] = self.ngram.propose_one(tokens, max(room, 0))
        else:
            assert self.drafter is not None
            entries = [e for e in entries if _eligible(e[0])]
            if self.target is not None:
                hidden = self.target.aux_hidden  # [T, 3H]
            drafts = self.drafter.propose(entries, hidden, eligible)
        for s in sampled:
            if s.grammar is not None and drafts.get(s.req_id):
                # Only drafts the grammar accepts: verification walks its matcher through them.
                drafts[s.req_id] = drafts[s.req_id][: s.grammar.validate_tokens(drafts[s.req_id])]
        return [drafts.get(s.req_id, []) for s in sampled]


def _eligible(state) -> bool:
    # A grammar still waiting for the reasoning to end switches on mid-output, which a matcher
    # rollback cannot undo: such requests wait for it without drafts.
    return spec_eligible(state.sampling) and (state.grammar is None or state.grammar.is_active)
