"""Scheduler driven by a tiny deterministic "model" that keeps a worker's view of every request.

`FakeWorker` is a test driver, not a stand-in for our worker: it applies each ExecuteStep's
`finished` / `new` / `cached` exactly as a worker must, asserts the scheduler's deltas agree with
what it holds, and simulates KV contents (each computed token written to its block slot, the
whole computed prefix read back every step). A wrong block table, a bad prefix hit or a block
handed out while still in use therefore fails the test, not just a count.

`drive` runs the engine core's loop serially (depth 0) or pipelined like async scheduling
(depth 1): step N+1 is scheduled, and executed by the worker, before the scheduler sees result N.
Like the real worker, `FakeWorker` appends each token it samples to its own copy of the request,
so it computes step N+1 from tokens the scheduler only knows as placeholders.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

import pytest

from enginecore.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from enginecore.protocol import AddRequest, ExecuteStep, StepResult, TokenDelta, TokenLogprobs
from enginecore.scheduler import Scheduler
from sampling.params import SamplingParams

VOCAB = 50
EOS = 2
NextToken = Callable[[str, list[int]], int]


def hash_model(req_id: str, tokens: list[int]) -> int:
    """Next token from the whole context (never EOS), so recompute must reproduce it."""
    return 3 + (sum((i + 1) * t for i, t in enumerate(tokens[-5:])) + len(tokens)) % (VOCAB - 3)


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(hash_model("", tokens))
    return tokens[len(prompt):]


class WorkerReq:
    def __init__(self, tokens: list[int], block_ids: list[int], num_computed: int,
                 num_prompt: int, sampling: SamplingParams) -> None:
        self.tokens, self.block_ids, self.num_computed = tokens, block_ids, num_computed
        self.num_prompt, self.sampling = num_prompt, sampling


class FakeWorker:
    def __init__(self, block_size: int, next_token: NextToken = hash_model,
                 max_model_len: int | None = None) -> None:
        self.block_size = block_size
        self.next_token = next_token
        self.max_model_len = max_model_len  # if set, never sample past it
        self.reqs: dict[str, WorkerReq] = {}
        self.kv: dict[int, dict[int, int]] = defaultdict(dict)  # block id -> slot -> token

    def execute(self, step: ExecuteStep) -> StepResult:
        self._apply_deltas(step)
        req_ids, sampled, prompt_lps = [], [], {}
        for req_id, num in step.num_scheduled_tokens.items():
            wreq = self.reqs[req_id]
            start, end = wreq.num_computed, wreq.num_computed + num
            assert 0 < num and end <= len(wreq.tokens), (req_id, start, num, len(wreq.tokens))
            assert len(wreq.block_ids) * self.block_size >= end
            self._write_and_check_kv(wreq, start, end)
            wreq.num_computed = end
            if wreq.sampling.prompt_logprobs is not None:
                rows = self._prompt_logprob_rows(wreq, start, end)
                if rows.ranks:
                    prompt_lps[req_id] = rows
            if end == len(wreq.tokens):  # reached the end of known tokens: sample
                token = self.next_token(req_id, wreq.tokens)
                wreq.tokens.append(token)
                req_ids.append(req_id)
                sampled.append(token)
                self._check_limits(req_id, wreq)
        return StepResult(step.step_id, req_ids, sampled, prompt_logprobs=prompt_lps or None)

    def _check_limits(self, req_id: str, wreq: WorkerReq) -> None:
        # The scheduler must never make a worker sample a token the request cannot use.
        max_tokens = wreq.sampling.max_tokens
        assert max_tokens is None or len(wreq.tokens) - wreq.num_prompt <= max_tokens, req_id
        assert self.max_model_len is None or len(wreq.tokens) <= self.max_model_len, req_id

    def _apply_deltas(self, step: ExecuteStep) -> None:
        for req_id in step.finished:
            del self.reqs[req_id]  # KeyError: told to forget a request it never held
        for new in step.new:
            assert new.req_id not in self.reqs
            self.reqs[new.req_id] = WorkerReq(
                new.prompt_token_ids + new.output_token_ids, list(new.block_ids),
                new.num_computed_tokens, len(new.prompt_token_ids), new.sampling)
        cached = step.cached
        for req_id, new_ids, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                 cached.num_computed_tokens, strict=True):
            assert self.reqs[req_id].num_computed == num_computed, req_id
            self.reqs[req_id].block_ids.extend(new_ids)
        assert set(step.num_scheduled_tokens) == {n.req_id for n in step.new} | set(cached.req_ids)

    def _write_and_check_kv(self, wreq: WorkerReq, start: int, end: int) -> None:
        bs = self.block_size
        for pos in range(start, end):
            self.kv[wreq.block_ids[pos // bs]][pos % bs] = wreq.tokens[pos]
        for pos in range(end):  # what attention would read: the whole prefix
            assert self.kv[wreq.block_ids[pos // bs]].get(pos % bs) == wreq.tokens[pos], pos
        assert 0 not in wreq.block_ids  # the null block is never handed out

    @staticmethod
    def _prompt_logprob_rows(wreq: WorkerReq, start: int, end: int) -> TokenLogprobs:
        # Logits at position q score token q+1: rows for prompt positions start+1 .. end.
        positions = range(start + 1, min(end, wreq.num_prompt - 1) + 1)
        return TokenLogprobs([[wreq.tokens[p]] for p in positions],
                             [[-1.0] for _ in positions], [1 for _ in positions])


class Run:
    """Outputs collected from driving a scheduler to completion."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finish: dict[str, tuple[str, int | None]] = {}
        self.prompt_rows: dict[str, list[int]] = defaultdict(list)
        self.cached: dict[str, int] = {}
        self.steps: list[ExecuteStep] = []
        self.sampled_at: dict[str, list[int]] = defaultdict(list)  # step indices with a token

    def record(self, deltas: list[TokenDelta], step_index: int | None = None) -> None:
        """Collect deltas: from the update of run.steps[step_index], or from between steps."""
        for delta in deltas:
            req_id = delta.request_id
            assert req_id not in self.finish, f"{req_id}: output after its finish"
            self.tokens[req_id] += delta.new_token_ids
            if delta.new_token_ids and step_index is not None:
                self.sampled_at[req_id].append(step_index)
            if delta.prompt_logprobs is not None:
                self.prompt_rows[req_id] += [r[0] for r in delta.prompt_logprobs.token_ids]
            self.cached[req_id] = delta.num_cached_tokens
            if delta.finish_reason is not None:
                self.finish[req_id] = (delta.finish_reason, delta.stop_reason)


def drive(sched: Scheduler, worker: FakeWorker, run: Run | None = None,
          max_steps: int = 2000, until: Callable[[], bool] | None = None, depth: int = 0,
          between: Callable[[Run], list[TokenDelta]] | None = None) -> Run:
    """Schedule/execute/update until no request is left (or `until()`), checking each step.

    `depth` steps stay in flight between updates (0: serial; 1: async scheduling). `between`
    plays the frontend after each update (aborts, arrivals), with steps possibly in flight.
    Returns with nothing in flight.
    """
    run = run or Run()
    in_flight: deque[tuple[int, ExecuteStep, StepResult]] = deque()
    idle = 0
    for _ in range(max_steps):
        if (until is not None and until()) or not (sched.has_unfinished_requests() or in_flight):
            break
        step = sched.schedule()
        if step is not None:
            idle = 0
            check_step(sched, step)
            run.steps.append(step)
            in_flight.append((len(run.steps) - 1, step, worker.execute(step)))
        elif not in_flight:
            idle += 1
            assert idle < 3, "scheduler stuck with unfinished requests"
        if in_flight and (step is None or len(in_flight) > depth):
            _update_oldest(sched, worker, run, in_flight)
        if between is not None:
            run.record(between(run))
    else:
        raise AssertionError("did not finish")
    while in_flight:
        _update_oldest(sched, worker, run, in_flight)
    if not sched.has_unfinished_requests():
        assert sched.kv.usage == 0.0 and not sched.running and not sched.waiting
        assert set(worker.reqs) <= set(run.finish)  # it holds only what it is yet to forget
    return run


def check_step(sched: Scheduler, step: ExecuteStep) -> None:
    """Invariants of every step the scheduler hands out."""
    cfg = sched.config.scheduler
    assert 0 < sum(step.num_scheduled_tokens.values()) <= cfg.max_num_batched_tokens
    assert len(step.num_scheduled_tokens) <= cfg.max_num_seqs
    # A request preempted in a step is not re-admitted in that same step.
    assert not set(step.finished) & {new.req_id for new in step.new}
    for req_id in step.num_scheduled_tokens:  # never scheduled beyond what it can use
        request = sched.requests[req_id]
        max_tokens = request.sampling.max_tokens
        num_output = len(request.output_token_ids) + request.num_output_placeholders
        assert max_tokens is None or num_output <= max_tokens, request
        assert request.num_tokens_with_placeholders <= sched.max_model_len, request


def _update_oldest(sched: Scheduler, worker: FakeWorker, run: Run,
                   in_flight: deque[tuple[int, ExecuteStep, StepResult]]) -> None:
    index, step, result = in_flight.popleft()
    run.record(sched.update(step, result), index)
    # The worker has run every step sent so far: for each running request it holds the
    # scheduler's tokens followed by the ones the scheduler only knows as placeholders.
    for request in sched.running:
        wreq = worker.reqs[request.request_id]
        assert wreq.num_computed == request.num_computed_tokens, request
        assert wreq.tokens[:request.num_tokens] == request.all_token_ids, request
        assert len(wreq.tokens) == request.num_tokens_with_placeholders, request


@pytest.fixture(params=[0, 1], ids=["serial", "pipelined"])
def depth(request: pytest.FixtureRequest) -> int:
    """Steps in flight between updates: 0 like the serial core loop, 1 like async scheduling."""
    return request.param


def make_config(max_model_len: int = 128, block_size: int = 4, max_num_seqs: int = 8,
                max_num_batched_tokens: int = 32, chunked: bool = True, policy: str = "fcfs",
                prefix: bool = True) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="x", max_model_len=max_model_len, vocab_size=VOCAB,
                          eos_token_ids=[EOS]),
        cache=CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, enable_chunked_prefill=chunked,
                                  max_num_batched_tokens=max_num_batched_tokens, policy=policy))


def add(sched: Scheduler, req_id: str, prompt: list[int], priority: int = 0,
        arrival: float = 0.0, salt: str | None = None, **sampling: object) -> None:
    sampling.setdefault("max_tokens", 8)
    assert sched.add_request(AddRequest(req_id, prompt, SamplingParams(**sampling),
                                        arrival_time=arrival, priority=priority,
                                        cache_salt=salt)) is None


def prompt_of(seed: int, length: int) -> list[int]:
    return [3 + (seed * 7 + i * 13) % (VOCAB - 3) for i in range(length)]


def mixed_workload(sched: Scheduler) -> dict[str, tuple[list[int], int]]:
    specs = {f"r{i}": (prompt_of(i, 5 + (i * 5) % 13), 6 + (i * 3) % 9) for i in range(10)}
    for i, (req_id, (prompt, max_tokens)) in enumerate(specs.items()):
        add(sched, req_id, prompt, priority=i % 3, arrival=float(i), max_tokens=max_tokens)
    return specs


def test_budget_and_max_num_seqs_respected(depth: int):
    config = make_config(max_num_batched_tokens=16, max_num_seqs=3)
    sched = Scheduler(config, num_blocks=64)
    specs = mixed_workload(sched)
    run = drive(sched, FakeWorker(4), depth=depth)  # asserts budget and max_num_seqs every step
    assert max(len(s.num_scheduled_tokens) for s in run.steps) == 3
    assert max(sum(s.num_scheduled_tokens.values()) for s in run.steps) == 16
    for req_id, (prompt, max_tokens) in specs.items():
        assert run.tokens[req_id] == expected_tokens(prompt, max_tokens)
        assert run.finish[req_id] == ("length", None)
    assert sched.stats().step_count == len(run.steps)


def test_chunked_prefill_splits_prompt_and_samples_only_at_the_end(depth: int):
    sched = Scheduler(make_config(max_num_batched_tokens=8), num_blocks=32)
    prompt = prompt_of(1, 20)
    add(sched, "long", prompt, max_tokens=3)
    run = drive(sched, FakeWorker(4), depth=depth)
    assert [s.num_scheduled_tokens["long"] for s in run.steps] == [8, 8, 4, 1, 1]
    assert run.sampled_at["long"] == [2, 3, 4]
    assert [s.cached.num_computed_tokens for s in run.steps[1:]] == [[8], [16], [20], [21]]
    assert run.tokens["long"] == expected_tokens(prompt, 3)


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole(depth: int):
    sched = Scheduler(make_config(max_num_batched_tokens=16, chunked=False), num_blocks=32)
    add(sched, "a", prompt_of(1, 8), max_tokens=5)
    add(sched, "b", prompt_of(2, 16), max_tokens=2)
    add(sched, "c", prompt_of(3, 2), max_tokens=2)  # fits, but must not jump ahead of b
    run = drive(sched, FakeWorker(4), depth=depth)
    first = {r: next(i for i, s in enumerate(run.steps) if r in s.num_scheduled_tokens)
             for r in "abc"}
    assert run.steps[first["b"]].num_scheduled_tokens["b"] == 16
    assert first["b"] > run.sampled_at["a"][-1] and first["c"] > first["b"]
    for req_id, n in (("a", 5), ("b", 2), ("c", 2)):
        assert len(run.tokens[req_id]) == n


def test_second_identical_prompt_hits_the_prefix_cache(depth: int):
    sched = Scheduler(make_config(), num_blocks=32)
    prompt = prompt_of(5, 13)
    add(sched, "first", prompt, max_tokens=4)
    worker = FakeWorker(4)  # one worker: hits must read the KV that "first" wrote
    run = drive(sched, worker, depth=depth)
    add(sched, "second", prompt, max_tokens=4)
    add(sched, "salted", prompt, salt="other-tenant", max_tokens=4)
    worker_run = drive(sched, worker, depth=depth)
    step = worker_run.steps[0]
    assert step.num_scheduled_tokens == {"second": 1, "salted": 13}
    assert {n.req_id: n.num_computed_tokens for n in step.new} == {"second": 12, "salted": 0}
    assert worker_run.cached == {"second": 12, "salted": 0}
    assert run.cached["first"] == 0
    assert worker_run.tokens["second"] == run.tokens["first"] == worker_run.tokens["salted"]
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (39, 12)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_recomputes_to_the_same_tokens(policy: str, prefix: bool, depth: int):
    outputs = {}
    for num_blocks in (256, 12):  # 11 usable blocks = 44 tokens: more than any one request
        sched = Scheduler(make_config(policy=policy, prefix=prefix), num_blocks=num_blocks)
        specs = mixed_workload(sched)
        run = drive(sched, FakeWorker(4), depth=depth)
        outputs[num_blocks] = (dict(run.tokens), sched.stats().num_preemptions)
        assert all(run.finish[r] == ("length", None) for r in specs)
    assert outputs[256][1] == 0 and outputs[12][1] > 0
    assert outputs[12][0] == outputs[256][0]


def test_priority_policy_admits_by_priority_then_arrival(depth: int):
    sched = Scheduler(make_config(policy="priority", max_num_seqs=1), num_blocks=32)
    for req_id, priority, arrival in (("low", 5, 0.0), ("high", 0, 1.0), ("mid", 1, 2.0),
                                      ("high2", 0, 3.0)):
        add(sched, req_id, prompt_of(priority, 4), priority=priority, arrival=arrival,
            max_tokens=2)
    run = drive(sched, FakeWorker(4), depth=depth)
    order = [n.req_id for s in run.steps for n in s.new]
    assert order == ["high", "high2", "mid", "low"]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_takes_the_last_running_and_requeues_it_first(policy: str):
    # Serial only: with a step in flight the victim loses its unconfirmed prompt blocks, so the
    # order differs (test_async_scheduling.py covers that case).
    # 8 usable blocks; three 8-token prompts take 2 blocks each, then each needs a third.
    sched = Scheduler(make_config(policy=policy, max_num_seqs=3), num_blocks=9)
    for req_id in "abcd":  # equal priority and arrival: ties keep admission order
        add(sched, req_id, prompt_of(ord(req_id), 8), max_tokens=4)
    run = drive(sched, FakeWorker(4))
    hit = next(i for i, s in enumerate(run.steps) if "c" in s.finished)
    assert run.steps[hit].finished == ["c"]
    assert set(run.steps[hit].num_scheduled_tokens) == {"a", "b"}
    # Back at the front of waiting: resumed before "d", which never ran.
    assert [n.req_id for s in run.steps[hit:] for n in s.new] == ["c", "d"]
    resumed = next(n for s in run.steps[hit:] for n in s.new if n.req_id == "c")
    assert resumed.output_token_ids == run.tokens["c"][:1]
    assert resumed.num_computed_tokens == 8  # its own prompt blocks, still cached
    assert run.cached["c"] == 0  # num_cached_tokens is the hit at the first schedule only
    for req_id in "abcd":
        assert run.tokens[req_id] == expected_tokens(prompt_of(ord(req_id), 8), 4)


def test_priority_preemption_returns_the_victims_tokens_to_the_budget(depth: int):
    # 3 usable blocks, budget 4 tokens.
    sched = Scheduler(make_config(policy="priority", max_num_batched_tokens=4), num_blocks=4)
    worker, run = FakeWorker(4), Run()
    add(sched, "v", prompt_of(1, 3), priority=2, arrival=0.0, max_tokens=6)
    drive(sched, worker, run, until=lambda: len(run.steps) == 1, depth=depth)
    add(sched, "a", prompt_of(2, 4), priority=0, arrival=1.0, max_tokens=3)
    drive(sched, worker, run, until=lambda: len(run.steps) == 2, depth=depth)
    add(sched, "w", prompt_of(3, 8), priority=1, arrival=2.0, max_tokens=2)
    drive(sched, worker, run, depth=depth)
    # v (first in the batch) takes the last free block, then a needs one: v, the lowest
    # priority, is preempted although already scheduled, and its token goes to w.
    hit = next(i for i, s in enumerate(run.steps) if "v" in s.finished)
    assert run.steps[hit].num_scheduled_tokens == {"a": 1, "w": 3}
    assert [n.req_id for n in run.steps[hit].new] == ["w"]
    assert sched.stats().num_preemptions >= 1
    for req_id, seed, length, max_tokens in (("v", 1, 3, 6), ("a", 2, 4, 3), ("w", 3, 8, 2)):
        assert run.tokens[req_id] == expected_tokens(prompt_of(seed, length), max_tokens)


def test_abort_frees_blocks_and_tells_workers(depth: int):
    sched = Scheduler(make_config(max_num_seqs=2), num_blocks=32)
    worker, run = FakeWorker(4), Run()
    for i in range(3):
        add(sched, f"r{i}", prompt_of(i, 6), max_tokens=20)
    drive(sched, worker, run, until=lambda: len(run.steps) == 2, depth=depth)
    assert [r.request_id for r in sched.running] == ["r0", "r1"] and sched.kv.usage > 0
    deltas = sched.abort_requests(["r1", "r2", "nope", "r1"])
    assert [(d.request_id, d.finish_reason, d.new_token_ids) for d in deltas] == [
        ("r1", "abort", []), ("r2", "abort", [])]
    # An abort that lands while the workers run a step: its result is dropped.
    step = sched.schedule()
    assert step is not None and set(step.num_scheduled_tokens) == {"r0"}
    result = worker.execute(step)
    sched.abort_requests(["r0"])
    assert sched.update(step, result) == [] and sched.kv.usage == 0.0
    assert step.finished == ["r1"]  # r2 never reached the workers
    add(sched, "r3", prompt_of(3, 6), max_tokens=20)
    drive(sched, worker, run, depth=depth)
    assert run.steps[-1].finished == [] and run.steps[2].finished == ["r0"]
    assert len(run.tokens["r3"]) == 20 and sched.kv.usage == 0.0
    assert sched.abort_requests(["r0", "r3"]) == []


def scripted(scripts: dict[str, list[int]]) -> NextToken:
    return lambda req_id, tokens: scripts[req_id][len(tokens) - 4]  # all prompts are 4 tokens


def test_stop_conditions(depth: int):
    sched = Scheduler(make_config(max_model_len=10), num_blocks=32)
    cases = {  # req_id: (script, sampling, expected tokens, expected finish)
        "eos": ([5, 6, EOS, 7], {}, [5, 6, EOS], ("stop", None)),
        "ignore_eos": ([5, EOS, 7, 8, 9], {"ignore_eos": True, "max_tokens": 4},
                       [5, EOS, 7, 8], ("length", None)),
        "stop_id": ([5, 6, 7], {"stop_token_ids": [6]}, [5, 6], ("stop", 6)),
        "min_tokens": ([EOS, 6, 9, 6, 7], {"stop_token_ids": [6], "min_tokens": 3},
                       [EOS, 6, 9, 6], ("stop", 6)),
        "max_tokens": ([5, 6, 7, 8], {"max_tokens": 3}, [5, 6, 7], ("length", None)),
        "max_model_len": ([5] * 10, {"max_tokens": None}, [5] * 6, ("length", None)),
    }
    for req_id, (_, sampling, _, _) in cases.items():
        add(sched, req_id, prompt_of(len(req_id), 4), **sampling)
    worker = FakeWorker(4, scripted({k: v[0] for k, v in cases.items()}), max_model_len=10)
    run = drive(sched, worker, depth=depth)
    for req_id, (_, _, tokens, finish) in cases.items():
        assert (run.tokens[req_id], run.finish[req_id]) == (tokens, finish), req_id


def test_unrunnable_requests_are_refused_with_error(depth: int):
    sched = Scheduler(make_config(max_model_len=16), num_blocks=4)  # 3 blocks: 12 tokens
    assert sched.max_model_len == 12
    refused = [AddRequest("too_long", prompt_of(1, 16), SamplingParams()),
               AddRequest("over_cache", prompt_of(2, 12), SamplingParams()),
               AddRequest("empty", [], SamplingParams())]
    for req in refused:
        delta = sched.add_request(req)
        assert delta is not None and (delta.request_id, delta.finish_reason) == (
            req.request_id, "error")
    assert not sched.has_unfinished_requests() and sched.schedule() is None
    add(sched, "ok", prompt_of(3, 11), max_tokens=4)
    dup = sched.add_request(AddRequest("ok", [3, 4], SamplingParams()))
    assert dup is not None and dup.finish_reason == "error"
    run = drive(sched, FakeWorker(4), depth=depth)
    assert run.finish == {"ok": ("length", None)} and len(run.tokens["ok"]) == 1  # cache is full


def test_prompt_logprobs_chunks_survive_preemption_without_repeats(depth: int):
    sched = Scheduler(make_config(max_num_batched_tokens=32), num_blocks=8)
    add(sched, "plain", prompt_of(1, 8), max_tokens=12)
    add(sched, "plp", prompt_of(2, 8), max_tokens=12, prompt_logprobs=0)
    run = drive(sched, FakeWorker(4), depth=depth)
    assert any("plp" in s.finished for s in run.steps)  # it was preempted at least once
    assert run.prompt_rows["plp"] == prompt_of(2, 8)[1:]
    assert run.tokens["plp"] == expected_tokens(prompt_of(2, 8), 12)
    # A chunk without a token still produces a delta.
    sched = Scheduler(make_config(max_num_batched_tokens=4), num_blocks=8)
    add(sched, "chunked", prompt_of(3, 10), max_tokens=1, prompt_logprobs=1)
    worker, run = FakeWorker(4), Run()
    step = sched.schedule()
    assert step is not None
    (delta,) = sched.update(step, worker.execute(step))
    assert delta.new_token_ids == [] and delta.prompt_logprobs is not None
    assert [r[0] for r in delta.prompt_logprobs.token_ids] == prompt_of(3, 10)[1:5]
    run = drive(sched, worker, depth=depth)
    assert run.prompt_rows["chunked"] == prompt_of(3, 10)[5:]


def test_reset_prefix_cache(depth: int):
    sched = Scheduler(make_config(), num_blocks=32)
    prompt = prompt_of(4, 9)
    add(sched, "a", prompt, max_tokens=20)
    worker, run = FakeWorker(4), Run()
    drive(sched, worker, run, until=lambda: len(run.steps) == 2, depth=depth)
    assert sched.reset_prefix_cache() is False
    drive(sched, worker, run, depth=depth)
    assert sched.reset_prefix_cache() is True
    add(sched, "b", prompt, max_tokens=1)
    run = drive(sched, worker, depth=depth)
    assert run.cached["b"] == 0 and sched.stats().prefix_cache_hits == 0
