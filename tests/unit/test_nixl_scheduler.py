"""Scheduler side of the NIXL connector, without a model or NIXL: a producer holds a
remote-decode request's blocks until a step result reports the consumer's notification (or its
timeout passes); a consumer reads a remote-prefill request's blocks in one step, then computes
only the rest. Step results are written by hand where the workers would send them."""

from __future__ import annotations

import time

from enginecore.config import (
    CacheConfig,
    EngineConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
)
from enginecore.protocol import AddRequest, KVTransferParams, StepResult
from enginecore.scheduler import _KV_POLL_S, Scheduler
from sampling.params import SamplingParams

BLOCK = 4
PROMPT = list(range(10, 21))  # 11 tokens: 2 full blocks + 3 (the last token is never read)


def make(role: str = "kv_both", timeout: float = 480.0) -> Scheduler:
    config = EngineConfig(
        model=ModelConfig(model="x", max_model_len=64, vocab_size=50, eos_token_ids=[2]),
        cache=CacheConfig(block_size=BLOCK),
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
        kv_transfer=KVTransferConfig(kv_connector="NixlConnector", kv_role=role,
                                     side_channel_port=7000, abort_request_timeout=timeout))
    return Scheduler(config, num_blocks=32)


def remote(block_ids: list[int], **changes) -> KVTransferParams:
    fields = dict(do_remote_prefill=True, remote_engine_id="p", remote_block_ids=block_ids,
                  remote_host="127.0.0.1", remote_port=7100, remote_request_id="p-1", tp_size=1)
    return KVTransferParams(**{**fields, **changes})


def add(sched: Scheduler, req_id: str, params: KVTransferParams | None = None,
        max_tokens: int = 4, **sampling) -> None:
    req = AddRequest(req_id, PROMPT, SamplingParams(max_tokens=max_tokens, **sampling),
                     kv_transfer_params=params)
    assert sched.add_request(req) is None


def run(sched: Scheduler, **result_fields):
    """Schedule one step and apply a result sampling token 5 for every request it completes."""
    step = sched.schedule()
    assert step is not None
    done = [r for r in step.num_scheduled_tokens if sched.requests[r].num_output_placeholders]
    result = StepResult(step.step_id, done, [5] * len(done), **result_fields)
    return step, sched.update(step, result)


def test_producer_holds_blocks_until_the_consumer_notifies():
    sched = make("kv_producer")
    add(sched, "a", KVTransferParams(do_remote_decode=True), max_tokens=1)
    step, deltas = run(sched)
    held = deltas[0].kv_transfer_params
    assert deltas[0].finish_reason == "length" and held is not None
    assert held.do_remote_prefill and held.remote_request_id == "a" and held.tp_size == 1
    assert held.remote_block_ids == step.new[0].block_ids[:len(PROMPT) // BLOCK]
    assert (held.remote_engine_id, held.remote_host, held.remote_port) == \
        ("127.0.0.1:7000", "127.0.0.1", 7000)
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks - 3 and sched.has_held_blocks()
    assert sched.add_request(AddRequest("a", PROMPT, SamplingParams())) is not None  # id taken
    # Idle: an empty step goes out (at most every _KV_POLL_S) to collect notifications.
    time.sleep(_KV_POLL_S)
    poll, _ = run(sched)
    assert poll.num_scheduled_tokens == {} and sched.has_held_blocks()
    time.sleep(_KV_POLL_S)
    run(sched, kv_send_done=["a", "unknown"])
    assert not sched.has_held_blocks() and sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_producer_frees_unread_blocks_after_the_timeout_and_plain_requests_at_once():
    sched = make("kv_producer", timeout=0.2)
    add(sched, "a", KVTransferParams(do_remote_decode=True), max_tokens=1)
    add(sched, "b", max_tokens=1)
    _, deltas = run(sched)
    assert [d.kv_transfer_params is not None for d in deltas] == [True, False]
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks - 3  # only a's
    time.sleep(0.25)
    assert sched.schedule() is None  # the timeout freed them: nothing left to poll for
    assert not sched.has_held_blocks() and sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_consumer_reads_full_prompt_blocks_then_computes_the_rest():
    sched = make("kv_consumer")
    add(sched, "d", remote([7, 8]))
    read_step = sched.schedule()
    assert read_step.num_scheduled_tokens == {}
    (read,) = read_step.kv_transfer.reads
    assert (read.req_id, read.remote_request_id, read.engine_id, read.port) == \
        ("d", "p-1", "p", 7100)
    assert read.remote_block_ids == [7, 8] and len(read.local_block_ids) == 2
    # While the read runs, empty steps go out: the workers poll it at each step.
    poll = sched.schedule()
    assert poll.num_scheduled_tokens == {} and poll.kv_transfer is None
    sched.update(read_step, StepResult(read_step.step_id, [], []))  # still in flight
    assert sched.requests["d"] in sched.nixl.recving.values() and not sched.waiting
    # The workers agree the read is done (reported with the poll step's result).
    sched.update(poll, StepResult(poll.step_id, [], [], kv_recv_done=["d"]))
    step, deltas = run(sched)
    (new,) = step.new
    assert new.num_computed_tokens == 8 and step.num_scheduled_tokens == {"d": 3}
    assert new.block_ids[:2] == read.local_block_ids
    assert deltas[0].num_cached_tokens == 8 and deltas[0].new_token_ids == [5]
    # The read blocks joined the prefix cache: a plain request with the prompt hits them.
    add(sched, "e")
    step, _ = run(sched)
    assert step.new[0].num_computed_tokens == 8 and step.kv_transfer is None


def test_consumer_reads_only_past_its_own_prefix_hits():
    sched = make("kv_consumer")
    add(sched, "warm", max_tokens=1)
    run(sched)
    add(sched, "d", remote([7, 8]))
    read_step = sched.schedule()
    (read,) = read_step.kv_transfer.reads
    assert read.remote_block_ids == [] and read.local_block_ids == []  # only notify P
    sched.update(read_step, StepResult(read_step.step_id, [], [], kv_recv_done=["d"]))
    step, deltas = run(sched)
    assert step.new[0].num_computed_tokens == 8 and deltas[0].num_cached_tokens == 8


def test_failed_read_computes_the_prompt_locally():
    sched = make("kv_consumer")
    add(sched, "d", remote([7, 8]))
    read_step = sched.schedule()
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks - 2
    sched.update(read_step, StepResult(read_step.step_id, [], [], kv_recv_failed=["d"]))
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks
    step, deltas = run(sched)
    assert step.new[0].num_computed_tokens == 0 and step.num_scheduled_tokens == {"d": 11}
    assert step.kv_transfer is None and deltas[0].num_cached_tokens == 0


def test_abort_while_reading_frees_the_blocks_once_the_read_ends():
    sched = make("kv_consumer")
    add(sched, "d", remote([7, 8]))
    read_step = sched.schedule()
    (delta,) = sched.abort_requests(["d"])
    assert delta.finish_reason == "abort" and not sched.has_unfinished_requests()
    # The READ may still write its blocks: they stay taken, and the id too, until it ends.
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks - 2
    assert sched.has_held_blocks()
    assert sched.add_request(AddRequest("d", PROMPT, SamplingParams())) is not None
    assert sched.update(read_step, StepResult(read_step.step_id, [], [],
                                              kv_recv_done=["d"])) == []
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks
    assert not sched.has_held_blocks() and sched.schedule() is None


def test_bad_remote_params_or_prompt_logprobs_compute_locally():
    sched = make("kv_consumer")
    add(sched, "tp", remote([7, 8], tp_size=2))  # P has another TP size: no read at all
    add(sched, "nohost", remote([7, 8], remote_host=None))
    step, _ = run(sched)
    assert step.kv_transfer is None
    assert step.num_scheduled_tokens == {"tp": 11, "nohost": 11}
    # Prompt logprobs need every position computed: nothing is read, P is only notified.
    add(sched, "lp", remote([7, 8]), prompt_logprobs=1)
    read_step = sched.schedule()
    assert read_step.kv_transfer.reads[0].remote_block_ids == []


def test_remote_prefill_error_names_the_field():
    assert "remote_host" in remote([1], remote_host=None).remote_prefill_error(1)
    assert "tp_size" in remote([1], tp_size=2).remote_prefill_error(1)
    assert "remote_port" in remote([1], remote_port=0).remote_prefill_error(1)
    assert remote([1]).remote_prefill_error(1) is None


def test_timeout_applies_while_the_producer_is_busy_too():
    sched = make("kv_producer", timeout=0.2)
    add(sched, "a", KVTransferParams(do_remote_decode=True), max_tokens=1)
    add(sched, "busy", max_tokens=40)
    run(sched)
    assert sched.has_held_blocks()
    time.sleep(0.25)
    step, _ = run(sched)
    assert step.num_scheduled_tokens == {"busy": 1} and not sched.has_held_blocks()


def test_read_blocks_of_waiting_requests_can_be_given_back():
    sched = make("kv_consumer")
    add(sched, "d", remote([7, 8]))
    read_step = sched.schedule()
    sched.update(read_step, StepResult(read_step.step_id, [], [], kv_recv_done=["d"]))
    (waiting,) = sched.waiting
    assert waiting.num_loaded_tokens == 8
    assert not sched.nixl.drop_loaded(sched.waiting, waiting, sched.kv)  # the head keeps its
    assert sched.nixl.drop_loaded(sched.waiting, None, sched.kv)
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks
    step, deltas = run(sched)
    assert step.new[0].num_computed_tokens == 8  # local prefix hits: the blocks stayed cached
