"""Custom logits processors that the engine tests load by name (this folder goes on PYTHONPATH)."""

from __future__ import annotations

from sampling.logits_processor import (
    AdapterLogitsProcessor,
    BatchUpdate,
    LogitsProcessor,
    update_sparse_state,
)
from sampling.params import SamplingParams


class TargetTokenLogitsProcessor(LogitsProcessor):
    """vLLM's DummyLogitsProcessor: rows with extra_args["target_token"] can only emit it."""

    def __init__(self, config, device, is_pin_memory):
        super().__init__(config, device, is_pin_memory)
        self.req_info: dict[int, int] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        target = (sampling_params.extra_args or {}).get("target_token")
        if target is not None and not isinstance(target, int):
            raise ValueError(f"target_token must be an int, got {target!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        update_sparse_state(self.req_info, batch_update,
                            lambda p, _prompt, _out: (p.extra_args or {}).get("target_token"))

    def apply(self, logits):
        for row, target in self.req_info.items():
            keep = logits[row, target].clone()
            logits[row] = float("-inf")
            logits[row, target] = keep
        return logits


class BanOutputRepeatsAdapter(AdapterLogitsProcessor):
    """Per-request callable: with extra_args["no_repeat"], never emit a token already emitted."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        if not (params.extra_args or {}).get("no_repeat"):
            return None

        def ban(output_ids, logits_row):
            if output_ids:
                logits_row[list(set(output_ids))] = float("-inf")
            return logits_row
        return ban


class NotAProcessor:
    """Loading this by name must fail with a clear error."""
