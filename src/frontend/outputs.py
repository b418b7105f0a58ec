"""What `AsyncEngine.generate` and `LLM.generate` return (vLLM's names and shapes).

Plain dataclasses: these never cross a process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from enginecore.protocol import KVTransferParams


class OutputKind(Enum):
    CUMULATIVE = "cumulative"  # every yield holds everything so far
    DELTA = "delta"  # every yield holds only what is new (streaming)
    FINAL_ONLY = "final_only"  # a single yield when the request finishes


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per position: token id -> its Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None  # stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # Entry 0 is None (the first prompt token has no context), then one dict per prompt token.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    # A prefill (NixlConnector, do_remote_decode) request's final output: where its KV waits.
    kv_transfer_params: KVTransferParams | None = None
