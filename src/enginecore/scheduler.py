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

Disaggregated prefill (`kv_transfer_config`, see enginecore/kv_transfer.py): a consumer admits a
request with the blocks the KV connector can load counted as computed (after local prefix hits);
a producer lists the full prompt blocks each step completes for saving. The connector's
`take_meta()` rides in the step as `kv_transfer`.

Requests that can never run (empty prompt, prompt >= max_model_len, duplicate id) are refused by
`add_request`, which returns their finish_reason="error" delta at once; they never enter a queue.

The effective max_model_len is min(model's, whole KV cache): a request then always fits the cache
alone, so preempting everything else always lets the oldest running request make progress.
"""

from __future__ import annotations

import bisect
import logging

from enginecore.config import EngineConfig
from enginecore.kv_cache import KVCacheManager
from enginecore.kv_transfer import make_kv_connector
from enginecore.protocol import (
    AddRequest,
    CachedReqs,
    ExecuteStep,
    NewReq,
    SchedulerStats,
    StepResult,
    TokenDelta,
    TokenLogprobs,
)
from enginecore.request import Request, RequestStatus

logger = logging.getLogger(__name__)

_RUNNING = RequestStatus.RUNNING

# An in-flight step's record: req_id -> (request, its num_computed_tokens before the step).
_Scheduled = dict[str, tuple[Request, int]]


class _StepPlan:
    """What one `schedule()` call hands out, turned into an ExecuteStep at the end."""

    __slots__ = ("budget", "num_scheduled", "new_block_ids", "admitted", "preempted")

    def __init__(self, budget: int) -> None:
        self.budget = budget  # tokens left this step
        self.num_scheduled: dict[str, int] = {}
        self.new_block_ids: dict[str, list[int]] = {}
        self.admitted: set[str] = set()  # sent as NewReq (first schedule or resumed)
        self.preempted: set[str] = set()

    def add(self, req_id: str, num_tokens: int, new_block_ids: list[int]) -> None:
        self.num_scheduled[req_id] = num_tokens
        self.new_block_ids[req_id] = new_block_ids
        self.budget -= num_tokens

    def drop(self, req_id: str) -> None:
        """Un-schedule a request preempted after it was scheduled (priority policy)."""
        self.budget += self.num_scheduled.pop(req_id, 0)
        self.new_block_ids.pop(req_id, None)


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
        self.connector = make_kv_connector(config)  # disaggregated prefill, or None

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
            step_count=self._step_id)

    def _refusal(self, req: AddRequest) -> str | None:
        num_prompt = len(req.prompt_token_ids)
        if num_prompt == 0:
            return "empty prompt"
        if num_prompt >= self.max_model_len:
            return (f"prompt of {num_prompt} tokens leaves no room under max_model_len="
                    f"{self.max_model_len} (model limit or KV-cache capacity)")
        if req.request_id in self.requests:
            return "duplicate request id"
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

    def _finish(self, request: Request, reason: str) -> None:
        if request.status is _RUNNING:
            self.running.remove(request)
            self._finished_ids.append(request.request_id)  # workers hold it: tell them
        else:
            self.waiting.remove(request)
        request.finish(reason)
        self.kv.free(request)  # safe with steps in flight: see the module docstring
        self._forget_in_flight(request)
        del self.requests[request.request_id]

    def _forget_in_flight(self, request: Request) -> None:
        """Make update() ignore what the steps already sent computed for `request`."""
        for scheduled in self._in_flight.values():
            scheduled.pop(request.request_id, None)

    # ------------------------------------------------------------ schedule

    def schedule(self) -> ExecuteStep | None:
        """Hand out this step's token budget; None when nothing can run."""
        plan = _StepPlan(self.sched_config.max_num_batched_tokens)
        self._schedule_running(plan)
        self._schedule_waiting(plan)
        if not plan.num_scheduled:
            return None
        return self._build_step(plan)

    def _schedule_running(self, plan: _StepPlan) -> None:
        for request in list(self.running):
            if plan.budget == 0:
                break
            if request.status is not _RUNNING:  # preempted as a victim earlier in this loop
                continue
            if request.at_output_limit(self.max_model_len):
                continue  # its last token is already being sampled in flight
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens,
                          plan.budget)
            if num_new <= 0:
                continue
            block_ids = self._allocate_or_preempt(request, num_new, plan)
            if block_ids is not None:
                plan.add(request.request_id, num_new, block_ids)

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             plan: _StepPlan) -> list[int] | None:
        """New block ids for `num_new` more tokens, preempting until they fit; None if `request`
        itself was preempted, or must wait for blocks that finishing requests hold."""
        while (block_ids := self.kv.allocate_slots(request, num_new)) is None:
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

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        self.running.remove(request)
        self.kv.free(request)
        self._forget_in_flight(request)  # its in-flight token is dropped
        request.preempt()
        self._enqueue(request, front=True)
        self._finished_ids.append(request.request_id)
        self._num_preemptions += 1
        plan.drop(request.request_id)
        plan.preempted.add(request.request_id)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        max_num_seqs = self.sched_config.max_num_seqs
        while self.waiting and plan.budget > 0 and len(self.running) < max_num_seqs:
            request = self.waiting[0]  # waiting requests hold no blocks and 0 computed tokens
            if request.request_id in plan.preempted:
                # Re-admitting it in the step that evicted it would only churn: workers forget
                # and re-add it, and it recomputes what it just dropped.
                break
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_ext = self._num_external_tokens(request, len(hit_blocks))
            num_new = request.num_tokens - num_hit - num_ext
            if num_new > plan.budget:
                if not self.sched_config.enable_chunked_prefill:
                    break  # wait for a step where it fits whole; keep FCFS order
                num_new = plan.budget
            # External blocks are allocated like new ones but loaded instead of computed.
            block_ids = self.kv.allocate_slots(request, num_ext + num_new,
                                               computed_blocks=hit_blocks)
            if block_ids is None:
                break
            if num_ext:
                self._load_external(request, len(hit_blocks), block_ids, num_ext)
            self.waiting.pop(0)
            request.start_running(num_hit + num_ext)
            self.running.append(request)
            plan.add(request.request_id, num_new, block_ids)
            plan.admitted.add(request.request_id)

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

    def _build_step(self, plan: _StepPlan) -> ExecuteStep:
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
                    output_token_ids=list(request.output_token_ids)))
            else:
                cached.req_ids.append(req_id)
                cached.new_block_ids.append(plan.new_block_ids[req_id])
                cached.num_computed_tokens.append(request.num_computed_tokens)
            scheduled[req_id] = (request, request.num_computed_tokens)
            if self.connector is not None:
                self._save_computed(request, num_scheduled[req_id])
            request.num_computed_tokens += num_scheduled[req_id]
            if request.num_computed_tokens == request.num_tokens_with_placeholders:
                request.num_output_placeholders += 1  # the workers sample one token here
        self._step_id += 1
        self._in_flight[self._step_id] = scheduled
        step = ExecuteStep(self._step_id, new, cached, num_scheduled, finished=self._finished_ids,
                           kv_transfer=self.connector.take_meta() if self.connector else None)
        self._finished_ids = []
        return step

    # ------------------------------------------------------------ update

    def update(self, step: ExecuteStep, result: StepResult) -> list[TokenDelta]:
        """Apply a step's result: one delta per sampled token or prompt-logprob chunk."""
        # Requests that left since the step was sent are no longer in its record: skipped.
        scheduled = self._in_flight.pop(step.step_id)
        for req_id, (request, start) in scheduled.items():
            self.kv.cache_full_blocks(request, start + step.num_scheduled_tokens[req_id])

        prompt_logprobs = dict(result.prompt_logprobs or {})
        outputs = []
        for i, (req_id, token) in enumerate(zip(result.req_ids, result.sampled, strict=True)):
            if req_id not in scheduled:
                continue
            request, start = scheduled[req_id]
            request.append_output(token)
            delta = TokenDelta(
                req_id, [token], logprobs=result.logprobs[i] if result.logprobs else None,
                prompt_logprobs=self._new_prompt_logprobs(
                    request, prompt_logprobs.pop(req_id, None), start),
                num_cached_tokens=request.num_cached_tokens)
            stop = request.check_stop(self.eos_token_ids, self.max_model_len)
            if stop is not None:
                self._finish(request, stop[0])
                delta.finish_reason, delta.stop_reason = stop
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
