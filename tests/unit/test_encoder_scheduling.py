"""The scheduler's encoder budget and encoder-cache lifetime, driven like test_scheduler.py.

`EncoderWorker` wraps the scheduler tests' `FakeWorker` with a worker's encoder cache: each step it
drops `free_encoder_hashes`, then encodes `encoder_inputs`, then checks that every placeholder
token the step computes has its item's output cached, and that the step kept to the encoder
budget and the cache to its capacity. A freed-too-early entry or a missed encode fails here.
"""

from __future__ import annotations

import msgspec
import pytest
from test_scheduler import FakeWorker, Run, drive, expected_tokens, make_config, prompt_of

from enginecore.protocol import AddRequest, ExecuteStep, MMInput, StepResult
from enginecore.scheduler import Scheduler
from sampling.params import SamplingParams

PAD = 1  # placeholder token id (never sampled by the fake model)


class EncoderWorker(FakeWorker):
    def __init__(self, block_size: int, budget: int, capacity: int) -> None:
        super().__init__(block_size)
        self.budget, self.capacity = budget, capacity
        self.cache: dict[str, int] = {}  # hash -> rows
        self.mm: dict[str, list[MMInput]] = {}
        self.encoded: list[list[str]] = []  # hashes encoded, per step

    def execute(self, step: ExecuteStep) -> StepResult:
        for new in step.new:
            self.mm[new.req_id] = new.mm_inputs or []
        for key in step.free_encoder_hashes:
            self.cache.pop(key, None)
        encoded = [self.mm[r][i] for r, idx in step.encoder_inputs.items() for i in idx]
        assert sum(m.length for m in encoded) <= self.budget
        assert len({m.hash for m in encoded}) == len(encoded), "one hash encoded twice"
        self.encoded.append([m.hash for m in encoded])
        self.cache.update({m.hash: m.length for m in encoded})
        assert sum(self.cache.values()) <= self.capacity
        starts = {new.req_id: new.num_computed_tokens for new in step.new}
        for req_id in step.num_scheduled_tokens:
            start = starts.get(req_id, self.reqs[req_id].num_computed if req_id in self.reqs
                               else 0)
            end = start + step.num_scheduled_tokens[req_id]
            for m in self.mm[req_id]:
                if m.offset < end and m.offset + m.length > start:
                    assert m.hash in self.cache, (step.step_id, req_id, m.hash)
        return super().execute(step)


def mm_prompt(seed: int, images: list[tuple[str, int]], text: int = 3
              ) -> tuple[list[int], list[MMInput]]:
    """text, then per image (hash, length) its placeholders followed by text."""
    tokens = prompt_of(seed, text)
    items = []
    for i, (key, length) in enumerate(images):
        items.append(MMInput("image", key, len(tokens), length, [1, 2, length // 2]))
        tokens += [PAD] * length + prompt_of(seed + i + 1, text)
    return tokens, items


def make(budget: int, capacity: int, tokens: int = 16, num_blocks: int = 64,
         block_size: int = 4) -> tuple[Scheduler, EncoderWorker]:
    cfg = make_config(max_num_batched_tokens=tokens, block_size=block_size)
    cfg = msgspec.structs.replace(cfg, scheduler=msgspec.structs.replace(
        cfg.scheduler, max_num_encoder_input_tokens=budget, encoder_cache_size=capacity))
    return Scheduler(cfg, num_blocks), EncoderWorker(block_size, budget, capacity)


def add(sched: Scheduler, req_id: str, tokens: list[int], items: list[MMInput],
        max_tokens: int = 4) -> None:
    delta = sched.add_request(AddRequest(req_id, tokens, SamplingParams(max_tokens=max_tokens),
                                         mm_inputs=items))
    assert delta is None, delta


@pytest.mark.parametrize("depth", [0, 1], ids=["serial", "pipelined"])
def test_encoder_outputs_are_ready_and_freed(depth: int) -> None:
    sched, worker = make(budget=8, capacity=12, tokens=10)
    prompts = {
        "a": mm_prompt(1, [("cat", 6), ("dog", 4)]),
        "b": mm_prompt(2, [("cat", 6)]),  # shares an image with a
        "c": mm_prompt(3, [("fox", 8)]),
        "d": mm_prompt(4, [("dog", 4), ("dog", 4)]),  # the same image twice
    }
    for req_id, (tokens, items) in prompts.items():
        add(sched, req_id, tokens, items)
    run = drive(sched, worker, depth=depth)
    for req_id, (tokens, _) in prompts.items():
        assert run.tokens[req_id] == expected_tokens(tokens, 4)
    assert sched.encoder_cache.refs == {} and sched.encoder_cache.num_free == 12
    assert all(not r.encoder_refs for r in sched.requests.values())


def test_budget_cuts_before_an_item_that_does_not_fit() -> None:
    sched, worker = make(budget=8, capacity=8, tokens=32)
    a, b = mm_prompt(1, [("cat", 8)]), mm_prompt(2, [("dog", 8)])
    add(sched, "a", *a)
    add(sched, "b", *b)
    step = sched.schedule()
    # a runs whole (14 tokens); b stops right before its image: the budget went to a's.
    assert step.num_scheduled_tokens == {"a": 14, "b": 3}
    assert step.encoder_inputs == {"a": [0]}
    run = Run()
    run.record(sched.update(step, worker.execute(step)))
    step = sched.schedule()
    # a's placeholders are computed: its entry is freed (first, in the workers) and b's image
    # takes the room.
    assert step.free_encoder_hashes == ["cat"] and step.encoder_inputs == {"b": [0]}
    run.record(sched.update(step, worker.execute(step)))
    drive(sched, worker, run)
    assert run.tokens["b"] == expected_tokens(b[0], 4)


def test_shared_image_is_encoded_once_and_cached_for_later_requests() -> None:
    sched, worker = make(budget=16, capacity=16, tokens=64)
    x, y = mm_prompt(1, [("cat", 6)]), mm_prompt(2, [("cat", 6)])
    add(sched, "x", *x)
    add(sched, "y", *y)
    step = sched.schedule()
    assert step.encoder_inputs == {"x": [0]}  # y reuses x's encode in the same step
    sched.update(step, worker.execute(step))
    drive(sched, worker)
    assert sum(h.count("cat") for h in worker.encoded) == 1


def test_items_too_big_for_the_budget_are_refused() -> None:
    sched, _ = make(budget=4, capacity=16)
    tokens, items = mm_prompt(1, [("cat", 8)])
    delta = sched.add_request(AddRequest("a", tokens, SamplingParams(), mm_inputs=items))
    assert delta is not None and delta.finish_reason == "error"


@pytest.mark.parametrize("depth", [0, 1], ids=["serial", "pipelined"])
def test_preemption_re_encodes(depth: int) -> None:
    # 12 usable blocks of 4 tokens: four 20-token prompts with 8 outputs cannot all fit; two
    # pairs share an image, so a preemption may release an entry another request still uses.
    sched, worker = make(budget=8, capacity=16, tokens=16, num_blocks=13)
    prompts = {f"r{i}": mm_prompt(i, [(f"img{i % 2}", 8)], text=6) for i in range(4)}
    for req_id, (tokens, items) in prompts.items():
        add(sched, req_id, tokens, items, max_tokens=8)
    run = drive(sched, worker, depth=depth)
    assert sched.stats().num_preemptions > 0
    for req_id, (tokens, _) in prompts.items():
        assert run.tokens[req_id] == expected_tokens(tokens, 8)
    assert sched.encoder_cache.num_free == 16


def test_prefix_cache_keys_include_the_media_hash() -> None:
    sched, worker = make(budget=16, capacity=16, tokens=64)
    tokens, items = mm_prompt(1, [("cat", 8)])
    add(sched, "first", tokens, items)
    drive(sched, worker)
    other = [msgspec.structs.replace(items[0], hash="dog")]
    add(sched, "same-tokens-other-image", tokens, other)
    add(sched, "same-image", tokens, items)
    run = drive(sched, worker)
    assert run.cached["same-tokens-other-image"] == 0  # block 0 holds placeholders already
    assert run.cached["same-image"] == 12


@pytest.mark.parametrize("depth", [0, 1], ids=["serial", "pipelined"])
def test_abort_mid_image_releases_its_references(depth: int) -> None:
    sched, worker = make(budget=16, capacity=16, tokens=6)
    a, b = mm_prompt(1, [("cat", 12)]), mm_prompt(2, [("cat", 12)])
    add(sched, "a", *a)
    add(sched, "b", *b)
    aborted: list[bool] = []

    def abort_a_once(run) -> list:
        if aborted or "a" not in sched.requests or sched.requests["a"].num_computed_tokens < 6:
            return []
        aborted.append(True)
        return sched.abort_requests(["a"])

    run = drive(sched, worker, depth=depth, between=abort_a_once)
    assert aborted and run.finish["a"][0] == "abort"
    assert run.tokens["b"] == expected_tokens(b[0], 4)
    assert sched.encoder_cache.refs == {} and sched.encoder_cache.num_free == 16
