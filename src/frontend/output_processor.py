"""Turns the engine's `TokenDelta`s into `RequestOutput`s: detokenization, stop strings,
logprob formatting, and merging the n child requests of one `n > 1` request.

One `RequestState` per engine request (child); one `ParentRequest` per user request.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field

from enginecore.protocol import KVTransferParams, TokenDelta, TokenLogprobs
from frontend.detokenizer import IncrementalDetokenizer
from frontend.outputs import CompletionOutput, Logprob, OutputKind, PositionLogprobs, RequestOutput
from frontend.tokenizer import Tokenizer
from sampling.params import SamplingParams


def format_logprobs(tokenizer: Tokenizer, lp: TokenLogprobs) -> list[PositionLogprobs]:
    """Engine rows (chosen token first, then top-k) -> one {token_id: Logprob} per position."""
    out: list[PositionLogprobs] = []
    for ids, lps, rank in zip(lp.token_ids, lp.logprobs, lp.ranks, strict=True):
        position: PositionLogprobs = {}
        for j, (tok, value) in enumerate(zip(ids, lps, strict=True)):
            if tok in position:  # the chosen token may also be in the top-k
                continue
            position[tok] = Logprob(logprob=value, rank=rank if j == 0 else j,
                                    decoded_token=tokenizer.decode([tok],
                                                                   skip_special_tokens=False))
        out.append(position)
    return out


@dataclass
class ParentRequest:
    """Collects the completions of one user request and feeds its output queue."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    kind: OutputKind
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    completions: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    num_finished: int = 0
    kv_transfer_params: KVTransferParams | None = None

    def __post_init__(self) -> None:
        self.completions = [CompletionOutput(index=i) for i in range(self.n)]

    @property
    def finished(self) -> bool:
        return self.num_finished == self.n

    def publish(self, delta: CompletionOutput) -> None:
        """Queue a RequestOutput reflecting the change `delta` to one completion."""
        if self.kind is OutputKind.FINAL_ONLY and not self.finished:
            return
        outputs = [delta] if self.kind is OutputKind.DELTA else copy.deepcopy(self.completions)
        self.queue.put_nowait(RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, outputs=outputs, finished=self.finished,
            prompt_logprobs=self.prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
            kv_transfer_params=self.kv_transfer_params))

    def fail(self, error: BaseException) -> None:
        self.queue.put_nowait(error)


class RequestState:
    """One engine request (a child of a ParentRequest)."""

    def __init__(self, parent: ParentRequest, index: int, tokenizer: Tokenizer,
                 params: SamplingParams):
        self.parent = parent
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.detok = (IncrementalDetokenizer(tokenizer, parent.prompt_token_ids, params)
                      if params.detokenize else None)
        self.finished = False

    def process(self, delta: TokenDelta) -> bool:
        """Apply one delta; return True when a stop string ended the request here."""
        parent, out = self.parent, self.parent.completions[self.index]
        new = CompletionOutput(index=self.index, token_ids=list(delta.new_token_ids))
        if delta.prompt_logprobs is not None:
            rows = format_logprobs(self.tokenizer, delta.prompt_logprobs)
            if parent.prompt_logprobs is None:
                parent.prompt_logprobs = [None]
            if self.index == 0:
                parent.prompt_logprobs.extend(rows)
        parent.num_cached_tokens = max(parent.num_cached_tokens, delta.num_cached_tokens)
        if delta.kv_transfer_params is not None:
            parent.kv_transfer_params = delta.kv_transfer_params
        if delta.logprobs is not None:
            new.logprobs = format_logprobs(self.tokenizer, delta.logprobs)
            out.logprobs = (out.logprobs or []) + new.logprobs
            chosen = [row[0] for row in delta.logprobs.logprobs]
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + sum(chosen)
            new.cumulative_logprob = out.cumulative_logprob
        out.token_ids.extend(delta.new_token_ids)
        stopped_here = False
        if self.detok is not None:
            new.text = self.detok.update(delta.new_token_ids)
            if self.detok.stop_string is not None:
                stopped_here = delta.finish_reason is None
                self._finish(out, new, "stop", self.detok.stop_string)
            elif delta.finish_reason is not None:
                new.text += self.detok.flush()
            out.text += new.text
        if delta.finish_reason is not None and not self.finished:
            self._finish(out, new, delta.finish_reason, delta.stop_reason)
        if new.token_ids or new.text or new.finish_reason or delta.prompt_logprobs is not None:
            parent.publish(new)
        return stopped_here

    def _finish(self, out: CompletionOutput, new: CompletionOutput, reason: str,
                stop_reason: int | str | None) -> None:
        self.finished = True
        out.finish_reason = new.finish_reason = reason
        out.stop_reason = new.stop_reason = stop_reason
        self.parent.num_finished += 1
