"""LoRA in the engine core: the max_loras cap per step, the adapter in the prefix-cache hash, and
unloads forwarded to the workers. Driven by test_scheduler's checking FakeWorker (real KV-content
checks), with a record of which adapter each request runs with."""

from __future__ import annotations

import pytest
from test_scheduler import FakeWorker, drive, expected_tokens

from enginecore.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from enginecore.protocol import AddRequest, ExecuteStep, LoRARef
from enginecore.scheduler import Scheduler
from sampling.params import SamplingParams

ADAPTERS = [LoRARef(name=f"a{i}", int_id=i + 1, path=f"/adapters/a{i}") for i in range(4)]


def make_scheduler(max_loras: int, num_blocks: int = 64, enable_lora: bool = True) -> Scheduler:
    cfg = EngineConfig(model=ModelConfig(model="m", max_model_len=256, vocab_size=50,
                                         eos_token_ids=[2]),
                       cache=CacheConfig(block_size=4),
                       scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64),
                       lora=LoRAConfig(enable_lora=enable_lora, max_loras=max_loras))
    return Scheduler(cfg, num_blocks)


def add(sched: Scheduler, req_id: str, prompt: list[int], lora: LoRARef | None,
        max_tokens: int = 5) -> None:
    assert sched.add_request(AddRequest(req_id, prompt, SamplingParams(max_tokens=max_tokens,
                                                                       ignore_eos=True),
                                        lora=lora)) is None


class LoRAWorker(FakeWorker):
    """Also checks that no step holds more than `max_loras` adapters, and remembers each
    request's adapter from its NewReq."""

    def __init__(self, max_loras: int) -> None:
        super().__init__(block_size=4)
        self.max_loras = max_loras
        self.lora_of: dict[str, LoRARef | None] = {}
        self.max_seen = 0
        self.removed: list[int] = []

    def execute(self, step: ExecuteStep):
        for new in step.new:
            self.lora_of[new.req_id] = new.lora
        self.removed += step.removed_loras
        ids = {self.lora_of[r].int_id for r in step.num_scheduled_tokens
               if self.lora_of[r] is not None}
        assert len(ids) <= self.max_loras, ids
        self.max_seen = max(self.max_seen, len(ids))
        return super().execute(step)


@pytest.mark.parametrize("max_loras", [1, 2])
@pytest.mark.parametrize("depth", [0, 1])
def test_step_never_exceeds_max_loras(max_loras: int, depth: int) -> None:
    sched = make_scheduler(max_loras)
    worker = LoRAWorker(max_loras)
    prompts = {}
    for i in range(12):  # adapters interleaved in arrival order, plus base requests
        prompts[f"r{i}"] = [5 + i, 6, 7, 8, 9]
        add(sched, f"r{i}", prompts[f"r{i}"], None if i % 4 == 3 else ADAPTERS[i % 3])
    run = drive(sched, worker, depth=depth)
    assert worker.max_seen == max_loras  # the cap was reached, never passed
    for req_id, prompt in prompts.items():
        assert run.tokens[req_id] == expected_tokens(prompt, 5)
        assert worker.lora_of[req_id] == (None if int(req_id[1:]) % 4 == 3
                                          else ADAPTERS[int(req_id[1:]) % 3])


def test_base_requests_pass_held_back_adapters() -> None:
    """A request waiting for a LoRA slot does not block base-model requests behind it."""
    sched = make_scheduler(max_loras=1)
    add(sched, "a", [5, 6, 7], ADAPTERS[0], max_tokens=20)
    add(sched, "b", [5, 6, 8], ADAPTERS[1])
    add(sched, "c", [5, 6, 9], None)
    step = sched.schedule()
    assert set(step.num_scheduled_tokens) == {"a", "c"}
    assert [r.request_id for r in sched.waiting] == ["b"]


def test_prefix_cache_is_per_adapter() -> None:
    """The same prompt under another adapter (or none) never hits; the same adapter does."""
    sched = make_scheduler(max_loras=4)
    worker = LoRAWorker(4)
    prompt = list(range(10, 30))  # 5 full blocks
    add(sched, "first", prompt, ADAPTERS[0])
    drive(sched, worker)
    for req_id, lora in [("base", None), ("other", ADAPTERS[1]), ("same", ADAPTERS[0])]:
        add(sched, req_id, prompt, lora)
        run = drive(sched, worker)
        assert run.cached[req_id] == (16 if req_id == "same" else 0), req_id


def test_removed_lora_reaches_the_workers() -> None:
    sched = make_scheduler(max_loras=1)
    worker = LoRAWorker(1)
    sched.remove_lora(7)
    add(sched, "a", [5, 6, 7], None)
    drive(sched, worker)
    assert worker.removed == [7]


def test_failed_request_finishes_with_error_and_caches_nothing() -> None:
    """A request whose adapter failed in the workers ends with "error"; the KV it got (computed
    without the adapter) is never registered in the prefix cache."""
    sched = make_scheduler(max_loras=2)
    worker = LoRAWorker(2)
    prompt = list(range(10, 30))
    add(sched, "bad", prompt, ADAPTERS[0])
    add(sched, "good", [5, 6, 7], None)
    step = sched.schedule()
    result = worker.execute(step)
    result.failed = ["bad"]
    deltas = {d.request_id: d for d in sched.update(step, result)}
    assert deltas["bad"].finish_reason == "error" and deltas["bad"].new_token_ids == []
    assert deltas["good"].new_token_ids and "bad" not in sched.requests
    drive(sched, worker)
    add(sched, "again", prompt, ADAPTERS[0])
    assert drive(sched, worker).cached["again"] == 0
