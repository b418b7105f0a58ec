"""Async scheduling: step N+1 is scheduled before result N reaches the scheduler.

The pipelined driver (`drive(..., depth=1)` from test_scheduler.py) keeps a worker-side view of
every request exactly as a worker does and checks it against the scheduler after every update;
it also checks that no block is reused while a step still reads it. Here: random workloads must
give the same outputs serially and pipelined, and the in-flight corner cases (finish, abort,
preemption, prefix-cache registration) behave as the scheduler's module docstring says.
"""

from __future__ import annotations

import random

from test_scheduler import (
    EOS,
    VOCAB,
    FakeWorker,
    Run,
    add,
    drive,
    expected_tokens,
    make_config,
    prompt_of,
)

from enginecore.protocol import AddRequest, ExecuteStep, StepResult, TokenDelta
from enginecore.scheduler import Scheduler
from sampling.params import SamplingParams


def eos_model(req_id: str, tokens: list[int]) -> int:
    """Next token from the context; EOS now and then, so requests stop at varied lengths."""
    h = (sum((i + 3) * t for i, t in enumerate(tokens[-6:])) * 31 + len(tokens)) % 1009
    return EOS if h % 11 == 0 else 3 + h % (VOCAB - 3)


def reference(prompt: list[int], sp: SamplingParams, max_model_len: int) -> tuple[list[int], str]:
    """Tokens and finish reason of one request generated alone, straight from the model."""
    tokens: list[int] = []
    while True:
        token = eos_model("", prompt + tokens)
        tokens.append(token)
        if len(tokens) >= sp.min_tokens and (
                (token == EOS and not sp.ignore_eos) or token in sp.stop_token_ids):
            return tokens, "stop"
        if (sp.max_tokens is not None and len(tokens) >= sp.max_tokens) or \
                len(prompt) + len(tokens) >= max_model_len:
            return tokens, "length"


class Workload:
    """A random engine configuration and request mix, with arrivals and aborts between steps."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.block_size = rng.choice([2, 4, 8])
        chunked = rng.random() < 0.8
        max_model_len = 48
        self.config = make_config(
            max_model_len=max_model_len, block_size=self.block_size,
            max_num_seqs=rng.randint(1, 8), chunked=chunked,
            max_num_batched_tokens=rng.randint(4, 40) if chunked else max_model_len,
            policy=rng.choice(["fcfs", "priority"]), prefix=rng.random() < 0.7)
        # From a cache smaller than one max_model_len request (so preemption is common) up.
        self.num_blocks = rng.choice([4, 6, 10, 16, 64]) * 8 // self.block_size
        bases = [prompt_of(rng.randrange(100), 24) for _ in range(3)]  # shared prefixes
        self.requests: list[AddRequest] = []
        for i in range(rng.randint(1, 12)):
            prompt = rng.choice(bases)[:rng.randint(0, 20)] + prompt_of(1000 + seed * 50 + i,
                                                                       rng.randint(1, 20))
            sp = SamplingParams(
                max_tokens=rng.choice([None, 1, 2, 5, 12, 30]), ignore_eos=rng.random() < 0.2,
                min_tokens=rng.choice([0, 0, 3]), prompt_logprobs=rng.choice([None, None, 0]),
                stop_token_ids=rng.sample(range(3, VOCAB), rng.choice([0, 0, 2])))
            self.requests.append(AddRequest(f"q{i}", prompt, sp, priority=rng.randint(0, 2),
                                            arrival_time=float(i)))
        # Request index -> frontend calls before it arrives; req_id -> abort after k tokens.
        self.arrive_after = {i: rng.choice([0, 0, rng.randint(1, 30)])
                             for i in range(len(self.requests))}
        self.abort_at = {f"q{i}": rng.randint(0, 6) for i in range(len(self.requests))
                         if rng.random() < 0.2}

    def run(self, depth: int) -> tuple[Scheduler, Run]:
        sched = Scheduler(self.config, self.num_blocks)
        worker = FakeWorker(self.block_size, eos_model, max_model_len=sched.max_model_len)
        run, pending, ticks = Run(), dict(enumerate(self.requests)), [0]

        def frontend(run: Run) -> list[TokenDelta]:
            deltas = []
            for i in [i for i in pending if self.arrive_after[i] <= ticks[0]]:
                refused = sched.add_request(pending.pop(i))
                deltas += [refused] if refused is not None else []
            ticks[0] += 1
            for req_id, k in self.abort_at.items():
                if req_id not in run.finish and len(run.tokens[req_id]) >= k:
                    deltas += sched.abort_requests([req_id])
            return deltas

        run.record(frontend(run))
        while pending or sched.has_unfinished_requests():
            drive(sched, worker, run, depth=depth, between=frontend)
            run.record(frontend(run))
        # Workers still hold finished requests until the next step tells them to forget.
        add(sched, "flush", [3, 4, 5], max_tokens=1)
        drive(sched, worker, run, depth=depth)
        assert set(worker.reqs) <= {"flush"}
        return sched, run


def test_random_workloads_pipelined_match_serial():
    seen = {"preempted": 0, "abort": 0, "stop": 0, "length": 0, "error": 0, "small_budget": 0}
    for seed in range(150):
        workload = Workload(seed)
        outputs = {}
        for depth in (0, 1):
            sched, run = workload.run(depth)
            outputs[depth] = (dict(run.tokens), run.finish, dict(run.prompt_rows))
            seen["preempted"] += sched.stats().num_preemptions
        assert outputs[0] == outputs[1], seed
        tokens, finish, prompt_rows = outputs[1]
        for req in workload.requests:
            req_id = req.request_id
            reason = finish[req_id][0]
            seen[reason] += 1
            if reason == "error":  # prompt too long for the (tiny) cache
                continue
            want, want_reason = reference(req.prompt_token_ids, req.sampling, sched.max_model_len)
            if req.sampling.prompt_logprobs is not None and reason != "abort":
                assert prompt_rows.get(req_id, []) == req.prompt_token_ids[1:], (seed, req_id)
            if reason == "abort":
                assert tokens[req_id] == want[:workload.abort_at[req_id]], (seed, req_id)
            else:
                assert (tokens[req_id], reason) == (want, want_reason), (seed, req_id)
        seen["small_budget"] += workload.config.scheduler.max_num_batched_tokens < 24
    assert all(count > 5 for count in seen.values()), seen  # every path was exercised


def start(sched: Scheduler, worker: FakeWorker) -> tuple[ExecuteStep, StepResult]:
    """Schedule one step and let the worker run it at once (its result is applied later)."""
    step = sched.schedule()
    assert step is not None
    return step, worker.execute(step)


def test_decoding_request_gets_one_token_per_step_while_a_step_is_in_flight():
    sched, worker = Scheduler(make_config(), num_blocks=32), FakeWorker(4)
    prompt = prompt_of(1, 6)
    add(sched, "a", prompt, max_tokens=4)
    s1, r1 = start(sched, worker)
    s2, r2 = start(sched, worker)  # before result 1: the token it computes is a placeholder
    assert s2.num_scheduled_tokens == {"a": 1} and s2.cached.num_computed_tokens == [6]
    assert sched.requests["a"].num_output_placeholders == 2
    (delta,) = sched.update(s1, r1)
    assert delta.new_token_ids == expected_tokens(prompt, 1)
    s3, r3 = start(sched, worker)
    s4, r4 = start(sched, worker)
    # Outputs + placeholders reach max_tokens: nothing more may be scheduled until one lands.
    assert sched.schedule() is None
    deltas = [d for s, r in ((s2, r2), (s3, r3), (s4, r4)) for d in sched.update(s, r)]
    assert [t for d in deltas for t in d.new_token_ids] == expected_tokens(prompt, 4)[1:]
    assert deltas[-1].finish_reason == "length" and sched.kv.usage == 0.0


def test_request_finished_with_a_step_in_flight_emits_nothing_more():
    sched, worker = Scheduler(make_config(), num_blocks=32), FakeWorker(4, eos_at_second_token)
    add(sched, "a", prompt_of(1, 6), max_tokens=10)
    add(sched, "b", prompt_of(2, 6), max_tokens=10, ignore_eos=True)
    s1, r1 = start(sched, worker)
    s2, r2 = start(sched, worker)
    sched.update(s1, r1)
    s3, r3 = start(sched, worker)  # "a" will have hit EOS in s2: its token in s3 is wasted
    deltas = {d.request_id: d for d in sched.update(s2, r2)}
    assert (deltas["a"].new_token_ids, deltas["a"].finish_reason) == ([EOS], "stop")
    assert "a" not in sched.requests and "a" in r3.req_ids  # the worker did sample it
    assert [d.request_id for d in sched.update(s3, r3)] == ["b"]
    s4, _ = start(sched, worker)
    assert s4.finished == ["a"] and set(s4.num_scheduled_tokens) == {"b"}
    assert set(worker.reqs) == {"b"}


def eos_at_second_token(req_id: str, tokens: list[int]) -> int:
    return EOS if len(tokens) == 7 else 3 + len(tokens)  # prompts are 6 tokens


def test_abort_with_a_step_in_flight():
    sched, worker = Scheduler(make_config(), num_blocks=32), FakeWorker(4)
    add(sched, "a", prompt_of(1, 6), max_tokens=10)
    add(sched, "b", prompt_of(2, 6), max_tokens=10)
    s1, r1 = start(sched, worker)
    s2, r2 = start(sched, worker)
    (delta,) = sched.abort_requests(["a"])
    assert (delta.request_id, delta.finish_reason, delta.new_token_ids) == ("a", "abort", [])
    assert [d.request_id for d in sched.update(s1, r1)] == ["b"]
    assert [d.request_id for d in sched.update(s2, r2)] == ["b"]
    s3, _ = start(sched, worker)
    assert s3.finished == ["a"] and set(s3.num_scheduled_tokens) == {"b"}


def test_preempted_request_drops_its_in_flight_token_and_resumes_from_real_tokens():
    # 8 usable blocks; three 8-token prompts take 2 blocks each, then each needs a third.
    sched, worker, run = Scheduler(make_config(max_num_seqs=3), num_blocks=9), FakeWorker(4), Run()
    for req_id in "abc":
        add(sched, req_id, prompt_of(ord(req_id), 8), max_tokens=4)
    s1, r1 = start(sched, worker)
    assert "c" in r1.req_ids  # c sampled a token in s1 ...
    s2, r2 = start(sched, worker)  # ... and is preempted before that result is back
    assert s2.finished == ["c"] and set(s2.num_scheduled_tokens) == {"a", "b"}
    deltas = sched.update(s1, r1)
    assert [d.request_id for d in deltas] == ["a", "b"]  # c's token is dropped
    run.record(deltas)
    run.record(sched.update(s2, r2))
    drive(sched, worker, run, depth=1)
    resumed = next(n for s in run.steps for n in s.new if n.req_id == "c")
    assert resumed.output_token_ids == []
    # Its prompt blocks were computed by s1, but it left before s1's result confirmed them, so
    # they were never registered in the prefix cache: it recomputes from scratch.
    assert resumed.num_computed_tokens == 0
    for req_id in "abc":
        assert run.tokens[req_id] == expected_tokens(prompt_of(ord(req_id), 8), 4)


def test_prefix_cache_registers_only_blocks_whose_result_arrived():
    sched, worker = Scheduler(make_config(), num_blocks=32), FakeWorker(4)
    prompt = prompt_of(3, 7)  # block 0 full after s1; block 1 fills with s2's token
    first = expected_tokens(prompt, 1)
    add(sched, "a", prompt, max_tokens=3)
    s1, r1 = start(sched, worker)
    add(sched, "b", prompt + [9], max_tokens=3)
    s2, r2 = start(sched, worker)  # s1 still in flight: block 0 is not findable yet
    assert [(n.req_id, n.num_computed_tokens) for n in s2.new] == [("b", 0)]
    sched.update(s1, r1)
    # s2 (in flight) computes a's position 7, which fills block 1: not registered yet.
    add(sched, "c", prompt + first + [9], max_tokens=3)
    s3, r3 = start(sched, worker)
    assert [(n.req_id, n.num_computed_tokens) for n in s3.new] == [("c", 4)]
    sched.update(s2, r2)
    add(sched, "d", prompt + first + [9], max_tokens=3)
    s4, _ = start(sched, worker)
    assert [(n.req_id, n.num_computed_tokens) for n in s4.new] == [("d", 8)]


def test_blocks_of_requests_finishing_in_flight_are_awaited_not_preempted_for():
    # 8 usable blocks of 4: two 16-token prompts fill them all.
    sched, worker = Scheduler(make_config(), num_blocks=9), FakeWorker(4)
    add(sched, "a", prompt_of(1, 16), max_tokens=1)
    add(sched, "b", prompt_of(2, 16), max_tokens=3)
    s1, r1 = start(sched, worker)
    # a's only token is in flight; b needs a fifth block that only a's finish frees. Preempting
    # b (the last running) would throw its prompt away to gain nothing: it waits a step.
    assert sched.schedule() is None
    assert [(d.request_id, d.finish_reason) for d in sched.update(s1, r1)] == [
        ("a", "length"), ("b", None)]
    run = Run()
    drive(sched, worker, run, depth=1)
    assert run.steps[0].num_scheduled_tokens == {"b": 1} and run.steps[0].finished == ["a"]
    assert sched.stats().num_preemptions == 0
