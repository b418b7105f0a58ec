"""`Request`: the engine core's view of one generation request.

The scheduler's only invariant lives here: `num_computed_tokens` (tokens whose KV is in the cache
or being written by a step already sent) chases `num_tokens_with_placeholders`. A prefix-cache hit
starts it at the cached length; preemption by recompute resets it to 0; each schedule() adds what
it scheduled, before the step runs.

Output placeholders (async scheduling). A step that schedules a request up to the end of its
tokens makes the workers sample one token; until that step's result reaches `update()` the token
is a placeholder: counted in `num_output_placeholders`, its id still unknown to the core. The
workers already know it (they append each sampled token to their copy of the request), so the
next step may compute it:

    [ prompt ................. | output ............ | placeholders ]
      ^0                                  num_tokens ^              ^ num_tokens_with_placeholders
      |--- num_computed_tokens: KV computed, or computed by a step already sent --->|

A decoding request with a step in flight has num_computed_tokens = num_tokens_with_placeholders
- 1: the newest placeholder's KV is computed by the step after the one that samples it.
"""

from __future__ import annotations

import enum

from enginecore.protocol import AddRequest


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # waiting again, blocks freed, outputs kept
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6


# TokenDelta.finish_reason -> status.
_FINISHED_STATUS = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
    "error": RequestStatus.FINISHED_ERROR,
}


class Request:
    """One request's tokens, progress, status and prefix-cache block hashes."""

    __slots__ = (
        "request_id", "client_index", "prompt_token_ids", "output_token_ids", "all_token_ids",
        "sampling", "priority", "arrival_time", "cache_salt", "status", "num_computed_tokens",
        "num_cached_tokens", "block_hashes", "num_prompt_logprobs_sent",
        "num_output_placeholders", "mm_inputs", "encoder_refs", "lora", "prompt_embeds",
        "spec_token_ids", "kv_transfer_params", "num_loaded_tokens",
    )

    def __init__(self, add: AddRequest) -> None:
        self.request_id = add.request_id
        self.client_index = add.client_index
        self.prompt_token_ids = add.prompt_token_ids
        self.output_token_ids: list[int] = []
        # prompt + output in one list, so block hashing slices any block without joining halves.
        self.all_token_ids = list(add.prompt_token_ids)
        self.sampling = add.sampling
        self.priority = add.priority
        self.arrival_time = add.arrival_time
        self.cache_salt = add.cache_salt
        self.lora = add.lora  # LoRARef or None (the base model)
        self.prompt_embeds = add.prompt_embeds  # PromptEmbeds | None
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens sampled by steps in flight whose ids update() has not seen yet.
        self.num_output_placeholders = 0
        self.num_cached_tokens = 0  # prefix-cache hit length at the first schedule
        # Chained hash of each full block of all_token_ids, filled lazily by KVCacheManager.
        self.block_hashes: list[bytes] = []
        # Prompt-logprob rows already reported (row i = prompt position i + 1); a request that is
        # preempted and recomputed must not report them twice.
        self.num_prompt_logprobs_sent = 0
        # Multimodal items (prompt order) and the indices whose encoder output this request
        # holds a reference to (EncoderCacheManager).
        self.mm_inputs = add.mm_inputs or []
        self.encoder_refs: set[int] = set()
        # Speculative decoding: drafts the workers proposed for this request's next step.
        self.spec_token_ids: list[int] = []
        # NixlConnector: the request's kv_transfer_params (consumed once acted on), and, while it
        # waits holding blocks a remote read filled, how many tokens they hold (None: no read).
        self.kv_transfer_params = add.kv_transfer_params
        self.num_loaded_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens."""
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Prompt + output tokens, counting those sampled in flight whose ids are not known yet."""
        return len(self.all_token_ids) + self.num_output_placeholders

    def append_output(self, token_id: int) -> None:
        """Record one sampled token, replacing the placeholder its step left."""
        assert self.num_output_placeholders > 0, self
        self.num_output_placeholders -= 1
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_accepted_draft(self, token_id: int) -> None:
        """Record a verified draft token (it precedes the step's sampled token, no placeholder)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def at_output_limit(self, max_model_len: int) -> bool:
        """True when outputs + placeholders already reach max_tokens or max_model_len, so
        computing more tokens could only sample one past the end."""
        max_tokens = self.sampling.max_tokens
        num_output = len(self.output_token_ids) + self.num_output_placeholders
        return ((max_tokens is not None and num_output >= max_tokens)
                or self.num_tokens_with_placeholders >= max_model_len)

    def block_extra_keys(self, block_index: int, block_size: int = 0) -> tuple[str | int, ...]:
        """Keys mixed into block `block_index`'s prefix-cache hash besides its tokens."""
        # The salt enters block 0 only: hashes are chained, so it reaches every later block, and
        # two different salts never share a single block. Multimodal content hashes enter every
        # block an item's placeholders overlap: placeholder token ids are the same for every
        # image. The LoRA id, like the salt, enters block 0, so no block is shared between two
        # adapters or an adapter and the base model. Embedding prompts: their placeholder ids say
        # nothing, the embeddings' hash (block 0, chained to the rest) does.
        keys: tuple[str | int, ...] = ()
        if block_index == 0 and self.cache_salt is not None:
            keys = (self.cache_salt,)
        if block_index == 0 and self.lora is not None:
            keys += ("lora", self.lora.int_id)
        if block_index == 0 and self.prompt_embeds is not None:
            keys += (self.prompt_embeds.hash,)
        if self.mm_inputs and block_size:
            start, end = block_index * block_size, (block_index + 1) * block_size
            keys += tuple(item.hash for item in self.mm_inputs
                          if item.offset < end and item.offset + item.length > start)
        return keys

    def check_stop(self, eos_token_ids: frozenset[int] | set[int],
                   max_model_len: int) -> tuple[str, int | None] | None:
        """(finish_reason, stop_reason) if the last sampled token ends the request, else None."""
        sp = self.sampling
        num_output = len(self.output_token_ids)
        if num_output >= sp.min_tokens:
            last = self.output_token_ids[-1]
            if not sp.ignore_eos and last in eos_token_ids:
                return "stop", None
            if last in sp.stop_token_ids:
                return "stop", last
        if sp.max_tokens is not None and num_output >= sp.max_tokens:
            return "length", None
        if self.num_tokens >= max_model_len:
            return "length", None
        return None

    def start_running(self, num_hit_tokens: int) -> None:
        """Admit from waiting with `num_hit_tokens` already in the prefix cache."""
        if self.status is RequestStatus.WAITING:  # resumed requests keep their first hit length
            self.num_cached_tokens = num_hit_tokens
        self.num_computed_tokens = num_hit_tokens
        self.status = RequestStatus.RUNNING

    def preempt(self) -> None:
        """Back to waiting: its KV is gone, so everything is recomputed on resume."""
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0  # in-flight tokens are dropped and sampled again
        self.num_loaded_tokens = None  # its blocks are freed: recomputed like the rest
        self.spec_token_ids = []  # the workers forget their draft state too

    def finish(self, finish_reason: str) -> None:
        """Mark finished with a TokenDelta finish_reason (stop | length | abort | error)."""
        self.status = _FINISHED_STATUS[finish_reason]

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens}"
                f"+{self.num_output_placeholders})")
