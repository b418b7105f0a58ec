"""`Scheduler`: token-budget continuous batching over `waiting` and `running`.

There is no prefill or decode phase. Every request has `num_computed_tokens` chasing `num_tokens`
(prompt + output). Each step hands out `max_num_batched_tokens`: first to running requests, in
order, then to waiting ones (FCFS, or by (priority, arrival_time) under the "priority" policy)
while fewer than `max_num_seqs` run. A prompt longer than what is left of the budget is chunked
(`enable_chunked_prefill`) or waits for a step where it fits whole. A prefix-cache hit only
starts `num_computed_tokens` at the cached length. Workers sample one token for each request
whose computed + scheduled tokens reach `num_tokens`.

    schedule() -> ExecuteStep --> workers --> StepResult -> update(step, result) -> [TokenDelta]

Async scheduling: steps may be in flight. schedule() advances `num_computed_tokens` at once and
counts each token the step will sample as an output placeholder (see request.py), so the next
schedule() can run before this step's result is back: a decoding request gets its next token
scheduled every step although the token's id is known only to the workers yet. The engine core
keeps one step in flight ahead (`async_scheduling`), or none; the scheduler works the same way
either way:

    schedule(N+1) -> send(N+1) -> receive(N) -> update(N) -> schedule(N+2) -> send(N+2) -> ...

A request that leaves while steps are in flight (finished in update(N), aborted, preempted) is
dropped from those steps' records, so their results for it are ignored: update(N+1) emits nothing
for a request finished in update(N) (workers learn it is gone from the next step's `finished`),
and a preempted request's in-flight token is dropped: it resumes from its real tokens and samples
that token again (seeded sampling is keyed by output position). Its blocks are freed at once,
although step N+1 may still write them. That is safe: workers run steps in order, so any later
step that is handed such a block afresh runs after N+1 wrote it; and none of the blocks N+1 writes
can be a prefix hit meanwhile, because only tokens a result vouches for are registered in the
prefix cache (in update(), never in schedule()), so a block is never findable before its KV exists.
While a running request's last token is in flight, its blocks will come back at the next update:
a request short of blocks then waits a step rather than preempting anyone.

Preemption by recompute: when a running request cannot get the blocks it needs, the last running
request (fcfs) or the lowest-priority one (largest priority value, latest arrival) loses its
blocks, drops to 0 computed tokens and goes back to the front of waiting. Workers are told to
forget it (`finished`) and later see it again as `new`, with the tokens it had generated.

Speculative decoding (docs/spec_decode.md): the workers return draft tokens with each result
(`StepResult.draft_token_ids`), kept in `Request.spec_token_ids`. A decoding request with drafts
is scheduled 1 + k tokens (its last token plus the k drafts, all within the token budget, capped
so outputs cannot pass max_tokens or max_model_len), and its blocks are allocated k lookahead
slots further for the draft model's own KV writes. update() advances it by the accepted count:
num_computed_tokens rolls back over the rejected drafts, whose KV slots later steps overwrite,
and only verified tokens' blocks reach the prefix cache. It needs synchronous scheduling (the
config turns async scheduling off), so no step is ever in flight when schedule() runs.

Disaggregated prefill (`kv_transfer_config`, see enginecore/kv_transfer.py): a consumer admits a
request with the blocks the KV connector can load counted as computed (after local prefix hits);
a producer lists the full prompt blocks each step completes for saving. The connector's
`take_meta()` rides in the step as `kv_transfer`. The NIXL connector (enginecore/nixl_connector.py)
works per request instead: a consumer request with remote-prefill params first waits in
`recving` while its remote read runs, then is admitted holding the read blocks; a producer holds
a finished remote-decode request's blocks until the consumer's notification (`kv_send_done`) or
a timeout. A step that computes nothing still goes out while reads are to be sent or in flight
(the workers poll them), and every `_KV_POLL_S` while blocks are held, so the workers report
notifications of an otherwise idle producer.

Requests that can never run (empty prompt, prompt >= max_model_len, duplicate id) are refused by
`add_request`, which returns their finish_reason="error" delta at once; they never enter a queue.

The effective max_model_len is min(model's, whole KV cache): a request then always fits the cache
alone, so preempting everything else always lets the oldest running request make progress.
"""

from __future__ import annotations

import bisect
import logging
import time

from enginecore.config import EngineConfig
from enginecore.encoder_cache import EncoderCacheManager
from enginecore.kv_cache import KVCacheManager
from enginecore.kv_transfer import make_kv_connector
from enginecore.nixl_connector import NixlConnector
from enginecore.protocol import (
    AddRequest,
    CachedReqs,
    ExecuteStep,
    KVTransferParams,
    NewReq,
    SchedulerStats,
    StepResult,
    TokenDelta,
    TokenLogprobs,
)
from enginecore.request import Request, RequestStatus
from enginecore.step_plan import SpecCounters, StepPlan

logger = logging.getLogger(__name__)

_RUNNING = RequestStatus.RUNNING

_KV_POLL_S = 0.05  # NixlConnector: the most an idle producer waits to hear of finished reads

# An in-flight step's record: req_id -> (request, its num_computed_tokens before the step).
_Scheduled = dict[str, tuple[Request, int]]


class Scheduler:
    """Decides, step by step, which tokens of which requests the workers compute."""

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.config = config
        self.sched_config = config.scheduler
        block_size = config.cache.block_size
        self.kv = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        capacity = self.kv.num_total_blocks * block_size
        self.max_model_len = min(config.model.max_model_len or capacity, capacity)
        self.eos_token_ids = frozenset(config.model.eos_token_ids)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: list[Request] = []  # in admission order (see _enqueue)
        self.running: list[Request] = []  # in batch order
        self._finished_ids: list[str] = []  # for the next step's `finished`
        self._in_flight: dict[int, _Scheduled] = {}  # step_id -> who it computes, oldest first
        self._step_id = 0
        self._num_preemptions = 0
        sched = config.scheduler
        self.encoder_budget = sched.max_num_encoder_input_tokens or sched.max_num_batched_tokens
        self.encoder_cache = EncoderCacheManager(
            sched.encoder_cache_size or sched.max_num_batched_tokens)
        self.max_loras = config.lora.max_loras
        self._removed_loras: list[int] = []  # for the next step's `removed_loras`
        spec = config.speculative
        self.num_spec_tokens = spec.num_speculative_tokens if spec.enabled else 0
        # Draft models write their own KV up to k positions past the verified tokens.
        self.num_lookahead = self.num_spec_tokens if spec.method not in (None, "ngram") else 0
        self._spec = SpecCounters(self.num_spec_tokens)
        self.connector = make_kv_connector(config)  # disaggregated prefill, or None
        self.nixl = self.connector if isinstance(self.connector, NixlConnector) else None
        self._last_step_time = 0.0  # monotonic: when the last step was built

    # ------------------------------------------------------------ requests in and out

    def add_request(self, req: AddRequest) -> TokenDelta | None:
        """Queue a request; returns its finish_reason="error" delta instead if it can never run."""
        error = self._refusal(req)
        if error is not None:
            logger.warning("request %s refused: %s", req.request_id, error)
            return TokenDelta(req.request_id, [], finish_reason="error")
        request = Request(req)
        self.requests[request.request_id] = request
        self._enqueue(request)
        return None

    def abort_requests(self, request_ids: list[str]) -> list[TokenDelta]:
        """Finish requests with finish_reason="abort"; unknown (or finished) ids are ignored."""
        deltas = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is not None:
                self._finish(request, "abort")
                deltas.append(TokenDelta(req_id, [], finish_reason="abort",
                                         num_cached_tokens=request.num_cached_tokens))
        return deltas

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.requests)

    def has_held_blocks(self) -> bool:
        """NixlConnector: finished requests' blocks wait for a consumer's read (producer), or
        for the end of their own read (consumer, aborted while reading)."""
        return self.nixl is not None and bool(self.nixl.held or self.nixl.recving)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; False while any block is in use."""
        return self.kv.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        """A snapshot for logging and /metrics."""
        kv = self.kv
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage, num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_total_blocks, prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self._num_preemptions,
            step_count=self._step_id, spec_num_drafts=self._spec.num_drafts,
            spec_num_draft_tokens=self._spec.num_draft_tokens,
            spec_num_accepted_tokens=self._spec.num_accepted,
            spec_accepted_per_pos=list(self._spec.per_pos))

    def _refusal(self, req: AddRequest) -> str | None:
        num_prompt = len(req.prompt_token_ids)
        if num_prompt == 0:
            return "empty prompt"
        if num_prompt >= self.max_model_len:
            return (f"prompt of {num_prompt} tokens leaves no room under max_model_len="
                    f"{self.max_model_len} (model limit or KV-cache capacity)")
        if req.request_id in self.requests or (self.nixl and (
                req.request_id in self.nixl.held or req.request_id in self.nixl.recving)):
            return "duplicate request id"
        limit = min(self.encoder_budget, self.encoder_cache.cache_size)
        for item in req.mm_inputs or ():
            if item.length > limit:
                return (f"{item.modality} of {item.length} tokens exceeds the encoder budget / "
                        f"cache of {limit} tokens (max_num_encoder_input_tokens, "
                        "encoder_cache_size)")
        return None

    def _enqueue(self, request: Request, front: bool = False) -> None:
        # A list, not a deque: the priority policy inserts by key, and popping the head of even
        # thousands of pointers is a short memmove.
        if self.sched_config.policy == "priority":
            insort = bisect.insort_left if front else bisect.insort_right
            insort(self.waiting, request, key=lambda r: (r.priority, r.arrival_time))
        elif front:
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def _finish(self, request: Request, reason: str) -> KVTransferParams | None:
        """Take `request` out; the kv_transfer_params of its held blocks, if it holds them."""
        reading = False
        if request.status is _RUNNING:
            self.running.remove(request)
            self._finished_ids.append(request.request_id)  # workers hold it: tell them
        elif self.nixl is not None and request.request_id in self.nixl.recving:
            reading = True  # a READ may still fill its blocks: freed when the read ends
        else:
            self.waiting.remove(request)
        request.finish(reason)
        held = None
        if self.nixl is not None and reason in ("stop", "length"):
            held = self.nixl.hold(request, self.kv)
        if held is None and not reading:
            self.kv.free(request)  # safe with steps in flight: see the module docstring
        self.encoder_cache.release_all(request)
        self._forget_in_flight(request)
        del self.requests[request.request_id]
        return held

    def _forget_in_flight(self, request: Request) -> None:
        """Make update() ignore what the steps already sent computed for `request`."""
        for scheduled in self._in_flight.values():
            scheduled.pop(request.request_id, None)

    # ------------------------------------------------------------ schedule

    def schedule(self) -> ExecuteStep | None:
        """Hand out this step's token budget; None when nothing can run."""
        plan = StepPlan(self.sched_config.max_num_batched_tokens, self.encoder_budget)
        for request in self.running:
            if request.encoder_refs:
                self.encoder_cache.release_done(request)
        self._schedule_running(plan)
        self._schedule_waiting(plan)
        if self.nixl is not None:
            self.nixl.expire(self.kv)
        if not plan.num_scheduled and not self._kv_step_due():
            return None
        return self._build_step(plan)

    def _kv_step_due(self) -> bool:
        """NixlConnector: a step must go out although it computes nothing (reads to send, or
        held blocks whose release notifications only a step result reports)."""
        if self.nixl is None:
            return False
        return self.nixl.needs_step() or (
            bool(self.nixl.held) and time.monotonic() - self._last_step_time >= _KV_POLL_S)

    def _schedule_running(self, plan: StepPlan) -> None:
        for request in list(self.running):
            if plan.budget == 0:
                break
            if request.status is not _RUNNING:  # preempted as a victim earlier in this loop
                continue
            if request.at_output_limit(self.max_model_len):
                continue  # its last token is already being sampled in flight
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens,
                          plan.budget)
            num_new, to_encode = self._plan_encoder(request, request.num_computed_tokens,
                                                    num_new, plan)
            if num_new <= 0:
                continue
            drafts = self._drafts(request, num_new, plan.budget)
            lookahead = self._lookahead(request, num_new + len(drafts))
            block_ids = self._allocate_or_preempt(request, num_new + len(drafts), plan, lookahead)
            if block_ids is not None:
                self._commit_encoder(request, num_new, to_encode, plan)
                plan.add(request.request_id, num_new + len(drafts), block_ids)
                if drafts:
                    plan.spec[request.request_id] = drafts

    def _drafts(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The drafts to verify with a decoding request's last token (capped; may be empty)."""
        if not request.spec_token_ids or num_new != 1 or request.num_output_placeholders:
            return []
        max_tokens = request.sampling.max_tokens
        room = self.max_model_len - request.num_tokens - 1  # the step samples one more token
        if max_tokens is not None:
            room = min(room, max_tokens - len(request.output_token_ids) - 1)
        return request.spec_token_ids[: max(0, min(room, budget - 1))]

    def _lookahead(self, request: Request, num_new: int) -> int:
        """KV slots past the scheduled tokens for the draft model, never past max_model_len."""
        if not self.num_lookahead:
            return 0
        end = request.num_computed_tokens + num_new
        return max(0, min(self.num_lookahead, self.max_model_len - end))

    def _allocate_or_preempt(self, request: Request, num_new: int, plan: StepPlan,
                             lookahead: int = 0) -> list[int] | None:
        """New block ids for `num_new` more tokens, preempting until they fit; None if `request`
        itself was preempted, or must wait for blocks that finishing requests hold."""
        while (block_ids := self.kv.allocate_slots(
                request, num_new, num_lookahead_tokens=lookahead)) is None:
            if any(r.at_output_limit(self.max_model_len) for r in self.running):
                # Their last tokens are in flight: their blocks come back at the next update.
                # Preempting anyone now would throw away work to save one step.
                return None
            if self.sched_config.policy == "priority":
                # reversed: among equals, the latest admitted goes first.
                victim = max(reversed(self.running), key=lambda r: (r.priority, r.arrival_time))
            else:
                victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return None
        return block_ids

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self.kv.free(request)
        self.encoder_cache.release_all(request)
        self._hand_over_encodes(request, plan)
        self._forget_in_flight(request)  # its in-flight token is dropped
        request.preempt()
        self._enqueue(request, front=True)
        self._finished_ids.append(request.request_id)
        self._num_preemptions += 1
        plan.drop(request.request_id)
        plan.preempted.add(request.request_id)

    def _schedule_waiting(self, plan: StepPlan) -> None:
        max_num_seqs = self.sched_config.max_num_seqs
        loras = self._running_loras()
        i = 0  # requests before i wait for a LoRA slot; they keep their place in the queue
        while i < len(self.waiting) and plan.budget > 0 and len(self.running) < max_num_seqs:
            request = self.waiting[i]  # waiting requests hold no blocks and 0 computed tokens
            if loras is not None and request.lora is not None and \
                    request.lora.int_id not in loras and len(loras) >= self.max_loras:
                i += 1  # would exceed max_loras adapters in one batch: skip it for now
                continue
            if request.request_id in plan.preempted:
                # Re-admitting it in the step that evicted it would only churn: workers forget
                # and re-add it, and it recomputes what it just dropped.
                break
            if self.nixl is not None and self.nixl.wants_read(request):
                if not self.nixl.start_read(request, self.kv):
                    break  # too few free blocks for the read: keep FCFS order
                self.waiting.pop(i)  # back at the head of waiting when the read is done
                continue
            if request.num_loaded_tokens is not None:  # read from a producer; holds the blocks
                hit_blocks, num_hit, num_ext = [], 0, request.num_loaded_tokens
            else:
                hit_blocks, num_hit = self.kv.get_computed_blocks(request)
                num_ext = self._num_external_tokens(request, len(hit_blocks))
            num_new = request.num_tokens - num_hit - num_ext
            if num_new > plan.budget:
                if not self.sched_config.enable_chunked_prefill:
                    break  # wait for a step where it fits whole; keep FCFS order
                num_new = plan.budget
            num_new, to_encode = self._plan_encoder(request, num_hit + num_ext, num_new, plan)
            if num_new <= 0:
                break
            # External blocks are allocated like new ones but loaded instead of computed.
            block_ids = self.kv.allocate_slots(
                request, num_ext + num_new, computed_blocks=hit_blocks,
                num_lookahead_tokens=self._lookahead(request, num_hit + num_ext + num_new))
            if block_ids is None:
                if not self.running and self.nixl is not None and \
                        self.nixl.drop_loaded(self.waiting, request, self.kv):
                    continue  # retry with the blocks other waiting requests gave back
                break
            if num_ext and request.num_loaded_tokens is None:
                self._load_external(request, len(hit_blocks), block_ids, num_ext)
            request.num_loaded_tokens = None
            self.waiting.pop(i)
            if loras is not None and request.lora is not None:
                loras.add(request.lora.int_id)
            request.start_running(num_hit + num_ext)
            self._commit_encoder(request, num_new, to_encode, plan)
            self.running.append(request)
            plan.add(request.request_id, num_new, block_ids)
            plan.admitted.add(request.request_id)

    # ------------------------------------------------------------ encoder (multimodal)

    def _plan_encoder(self, request: Request, start: int, num_new: int,
                      plan: StepPlan) -> tuple[int, list[int]]:
        """Cut [start, start + num_new) before an item this step cannot encode; the items it
        must encode."""
        if not request.mm_inputs:
            return num_new, []
        return self.encoder_cache.plan(request, start, num_new, plan.encoder_budget,
                                       plan.encoding)

    def _commit_encoder(self, request: Request, num_new: int, to_encode: list[int],
                        plan: StepPlan) -> None:
        """Reference the items request's scheduled range touches; queue the ones to encode."""
        if not request.mm_inputs:
            return
        cache = self.encoder_cache
        # An item planned as cached may have been freed meanwhile by a preemption: encode it too.
        missing = [i for i, item in enumerate(request.mm_inputs)
                   if item.offset < request.num_computed_tokens + num_new
                   and item.offset + item.length > request.num_computed_tokens
                   and item.hash not in cache.refs and item.hash not in plan.encoding]
        to_encode = sorted(set(to_encode) | set(missing))
        cache.commit(request, request.num_computed_tokens, num_new, to_encode)
        for i in to_encode:
            item = request.mm_inputs[i]
            if item.hash not in plan.encoding:
                plan.encoding.add(item.hash)
                plan.encoder_budget -= item.length
                plan.encoder_inputs.setdefault(request.request_id, []).append(i)

    def _hand_over_encodes(self, request: Request, plan: StepPlan) -> None:
        """A request preempted after it was scheduled this step no longer encodes its items:
        another scheduled request that references one takes the encode over."""
        for i in plan.encoder_inputs.pop(request.request_id, []):
            key = request.mm_inputs[i].hash
            holders = self.encoder_cache.refs.get(key, set()) & plan.num_scheduled.keys()
            if not holders:
                plan.encoding.discard(key)
                continue
            other = self.requests[min(holders)]
            index = next(j for j, item in enumerate(other.mm_inputs) if item.hash == key)
            plan.encoder_inputs.setdefault(other.request_id, []).append(index)

    def _running_loras(self) -> set[int] | None:
        """Adapter ids of the running requests (None without LoRA): every step computes a
        subset of `running`, so keeping these <= max_loras caps each step's adapters."""
        if not self.config.lora.enable_lora:
            return None
        return {r.lora.int_id for r in self.running if r.lora is not None}

    def remove_lora(self, lora_int_id: int) -> None:
        """Tell the workers (with the next step) to drop an unloaded adapter from their caches."""
        self._removed_loras.append(lora_int_id)

    def _num_external_tokens(self, request: Request, num_hit_blocks: int) -> int:
        """Tokens of full blocks after the local hits that the KV connector can load."""
        if self.connector is None or not self.kv.may_look_up(request):
            return 0
        # get_computed_blocks hashed every block a hit may cover (never the last token's).
        max_blocks = (request.num_tokens - 1) // self.kv.block_size
        keys = [h.hex() for h in request.block_hashes[num_hit_blocks:max_blocks]]
        return self.connector.num_external_blocks(keys) * self.kv.block_size

    def _load_external(self, request: Request, num_hit_blocks: int, new_block_ids: list[int],
                       num_ext: int) -> None:
        n = num_ext // self.kv.block_size
        keys = request.block_hashes[num_hit_blocks:num_hit_blocks + n]
        self.connector.add_loads(new_block_ids[:n], [h.hex() for h in keys])

    def _save_computed(self, request: Request, num_new: int) -> None:
        """Producer: save the full prompt blocks this step's forward completes."""
        size = self.kv.block_size
        first = request.num_computed_tokens // size
        end = min(request.num_computed_tokens + num_new,
                  len(request.prompt_token_ids)) // size
        if end <= first or not self.kv.may_look_up(request):
            return
        hashes = self.kv.block_hashes(request, end)
        block_ids = self.kv.block_ids(request.request_id)
        self.connector.add_saves(block_ids[first:end], [h.hex() for h in hashes[first:end]])

    def _build_step(self, plan: StepPlan) -> ExecuteStep:
        new: list[NewReq] = []
        cached = CachedReqs(req_ids=[], new_block_ids=[], num_computed_tokens=[])
        num_scheduled: dict[str, int] = {}
        scheduled: _Scheduled = {}
        for request in self.running:
            req_id = request.request_id
            if req_id not in plan.num_scheduled:
                continue
            num_scheduled[req_id] = plan.num_scheduled[req_id]
            if req_id in plan.admitted:
                new.append(NewReq(
                    req_id, request.prompt_token_ids, request.sampling,
                    block_ids=self.kv.block_ids(req_id),
                    num_computed_tokens=request.num_computed_tokens,
                    output_token_ids=list(request.output_token_ids),
                    mm_inputs=request.mm_inputs or None, lora=request.lora,
                    prompt_embeds=request.prompt_embeds))
            else:
                cached.req_ids.append(req_id)
                cached.new_block_ids.append(plan.new_block_ids[req_id])
                cached.num_computed_tokens.append(request.num_computed_tokens)
            scheduled[req_id] = (request, request.num_computed_tokens)
            if self.connector is not None:
                self._save_computed(request, num_scheduled[req_id])
            request.num_computed_tokens += num_scheduled[req_id]
            num_drafts = len(plan.spec.get(req_id, ()))
            if request.num_computed_tokens - num_drafts == request.num_tokens_with_placeholders:
                request.num_output_placeholders += 1  # the workers sample one token here
        self._step_id += 1
        self._last_step_time = time.monotonic()
        self._in_flight[self._step_id] = scheduled
        step = ExecuteStep(self._step_id, new, cached, num_scheduled, finished=self._finished_ids,
                           encoder_inputs=plan.encoder_inputs,
                           free_encoder_hashes=self.encoder_cache.take_freed(),
                           removed_loras=self._removed_loras,
                           scheduled_spec_tokens=plan.spec,
                           kv_transfer=self.connector.take_meta() if self.connector else None)
        self._finished_ids, self._removed_loras = [], []
        return step

    # ------------------------------------------------------------ update

    def update(self, step: ExecuteStep, result: StepResult) -> list[TokenDelta]:
        """Apply a step's result: one delta per request that got tokens or prompt logprobs."""
        # Requests that left since the step was sent are no longer in its record: skipped.
        scheduled = self._in_flight.pop(step.step_id)
        if self.nixl is not None:
            self.nixl.release(result.kv_send_done, self.kv)
            for request in self.nixl.finish_reads(result, self.kv):
                self._enqueue(request, front=True)
        # First: a failed request's KV (computed without its adapter) must never be cached.
        failed = self._fail(result.failed, scheduled)
        spec = step.scheduled_spec_tokens
        for req_id, (request, start) in scheduled.items():
            if req_id not in spec:  # verified drafts are known only below: cached there
                self.kv.cache_full_blocks(request, start + step.num_scheduled_tokens[req_id])

        prompt_logprobs = dict(result.prompt_logprobs or {})
        outputs = failed
        for i, (req_id, token) in enumerate(zip(result.req_ids, result.sampled, strict=True)):
            if req_id not in scheduled:
                continue
            request, start = scheduled[req_id]
            tokens = result.spec_token_ids[i] if result.spec_token_ids else [token]
            if req_id in spec:
                self._verify(request, spec[req_id], len(tokens) - 1)
            delta = TokenDelta(
                req_id, [], logprobs=result.logprobs[i] if result.logprobs else None,
                prompt_logprobs=self._new_prompt_logprobs(
                    request, prompt_logprobs.pop(req_id, None), start),
                num_cached_tokens=request.num_cached_tokens)
            stop = self._append_tokens(request, tokens, delta.new_token_ids)
            if req_id in spec:  # only verified tokens' blocks become findable
                self.kv.cache_full_blocks(
                    request, min(request.num_computed_tokens, request.num_tokens))
            if stop is not None:
                delta.kv_transfer_params = self._finish(request, stop[0])
                delta.finish_reason, delta.stop_reason = stop
            elif result.draft_token_ids:
                request.spec_token_ids = result.draft_token_ids[i]
            outputs.append(delta)

        for req_id, rows in prompt_logprobs.items():  # partial prefill chunks: no token yet
            if req_id not in scheduled:
                continue
            request, start = scheduled[req_id]
            rows = self._new_prompt_logprobs(request, rows, start)
            if rows is not None:
                outputs.append(TokenDelta(req_id, [], prompt_logprobs=rows,
                                          num_cached_tokens=request.num_cached_tokens))
        return outputs

    def _fail(self, req_ids: list[str], scheduled: _Scheduled) -> list[TokenDelta]:
        """Finish requests the workers could not run with finish_reason "error"."""
        deltas = []
        for req_id in req_ids:
            if scheduled.pop(req_id, None) is not None and req_id in self.requests:
                request = self.requests[req_id]
                logger.warning("request %s failed in the workers", req_id)
                self._finish(request, "error")
                deltas.append(TokenDelta(req_id, [], finish_reason="error",
                                         num_cached_tokens=request.num_cached_tokens))
        return deltas

    def _verify(self, request: Request, drafts: list[int], num_accepted: int) -> None:
        """Roll num_computed_tokens back over the rejected drafts and count acceptance."""
        request.num_computed_tokens -= len(drafts) - num_accepted
        request.spec_token_ids = []
        self._spec.record(len(drafts), num_accepted)

    def _append_tokens(self, request: Request, tokens: list[int],
                       out: list[int]) -> tuple[str, int | str | None] | None:
        """Append the step's tokens (accepted drafts, then the sampled one) to `request` and
        `out`, checking stop conditions after each: nothing after a stop is kept."""
        last = len(tokens) - 1
        for j, token in enumerate(tokens):
            if j < last:
                request.append_accepted_draft(token)
            else:
                request.append_output(token)
            out.append(token)
            stop = request.check_stop(self.eos_token_ids, self.max_model_len)
            if stop is not None:
                return stop
        return None

    @staticmethod
    def _new_prompt_logprobs(request: Request, rows: TokenLogprobs | None,
                             start: int) -> TokenLogprobs | None:
        """Drop rows already reported before a preemption made the prompt be recomputed."""
        # Computing tokens [start, start + n) yields rows for prompt positions start+1.., i.e.
        # row indices start.. (row i = position i + 1).
        if rows is None:
            return None
        skip = request.num_prompt_logprobs_sent - start
        request.num_prompt_logprobs_sent = max(request.num_prompt_logprobs_sent,
                                               start + len(rows.ranks))
        if skip <= 0:
            return rows
        if skip >= len(rows.ranks):
            return None
        return TokenLogprobs(rows.token_ids[skip:], rows.logprobs[skip:], rows.ranks[skip:])
