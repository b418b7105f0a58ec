"""Scheduler side of disaggregated prefill, without a model: which blocks a producer saves and
a consumer loads, with the store's files created by hand where a worker would write them."""

from __future__ import annotations

from pathlib import Path

from enginecore.config import (
    CacheConfig,
    EngineConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
)
from enginecore.protocol import AddRequest, ExecuteStep
from enginecore.scheduler import Scheduler
from sampling.params import SamplingParams

BLOCK = 4
PROMPT = list(range(10, 21))  # 11 tokens: 2 full blocks + 3 (the last token is never loaded)


def make(role: str, store: Path, budget: int = 64) -> Scheduler:
    config = EngineConfig(
        model=ModelConfig(model="x", max_model_len=64, vocab_size=50, eos_token_ids=[2]),
        cache=CacheConfig(block_size=BLOCK),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        kv_transfer=KVTransferConfig(kv_role=role,
                                     kv_connector_extra_config={"shm_path": str(store)}))
    return Scheduler(config, num_blocks=32)


def add(sched: Scheduler, req_id: str, prompt: list[int] = PROMPT, **sampling) -> None:
    assert sched.add_request(AddRequest(req_id, prompt, SamplingParams(max_tokens=4,
                                                                       **sampling))) is None


def write_saves(sched: Scheduler, step: ExecuteStep) -> list[str]:
    """Do what the producer's worker does after the forward: one file per saved block."""
    assert step.kv_transfer is not None
    store = sched.connector.store
    for io in step.kv_transfer.saves:
        Path(KVTransferConfig.block_file(store, io.key, 0)).write_bytes(b"kv")
    return [io.key for io in step.kv_transfer.saves]


def test_producer_saves_each_full_prompt_block_once_as_computed(tmp_path):
    sched = make("kv_producer", tmp_path, budget=6)  # chunked: 6 + 5 prompt tokens
    add(sched, "a")
    first = sched.schedule()
    block_ids = first.new[0].block_ids
    assert [io.block_id for io in first.kv_transfer.saves] == block_ids[:1]  # tokens 0..5
    keys = write_saves(sched, first)
    second = sched.schedule()
    assert [io.block_id for io in second.kv_transfer.saves] == [block_ids[1]]  # tokens 6..10
    keys += write_saves(sched, second)
    assert len(set(keys)) == 2
    add(sched, "b")  # same prompt: already stored, nothing saved twice
    assert all(s.kv_transfer is None for s in (sched.schedule(), sched.schedule()))


def test_consumer_loads_stored_blocks_and_computes_the_rest(tmp_path):
    producer = make("kv_producer", tmp_path)
    add(producer, "a")
    keys = write_saves(producer, producer.schedule())
    consumer = make("kv_consumer", tmp_path)
    add(consumer, "a")
    step = consumer.schedule()
    new = step.new[0]
    assert [(io.block_id, io.key) for io in step.kv_transfer.loads] == \
        list(zip(new.block_ids[:2], keys, strict=True))
    assert new.num_computed_tokens == 2 * BLOCK  # loaded, not computed
    assert step.num_scheduled_tokens == {"a": len(PROMPT) - 2 * BLOCK}
    assert not step.kv_transfer.saves  # a consumer never saves


def test_consumer_stops_at_the_first_missing_block(tmp_path):
    producer = make("kv_producer", tmp_path)
    add(producer, "a")
    keys = write_saves(producer, producer.schedule())
    Path(KVTransferConfig.block_file(producer.connector.store, keys[0], 0)).unlink()
    consumer = make("kv_consumer", tmp_path)
    add(consumer, "a")
    step = consumer.schedule()
    assert step.kv_transfer is None and step.new[0].num_computed_tokens == 0


def test_prompt_logprobs_requests_are_computed_not_loaded(tmp_path):
    producer = make("kv_producer", tmp_path)
    add(producer, "a")
    write_saves(producer, producer.schedule())
    consumer = make("kv_consumer", tmp_path)
    add(consumer, "a", prompt_logprobs=1)  # needs logits at every prompt position
    step = consumer.schedule()
    assert step.kv_transfer is None and step.num_scheduled_tokens == {"a": len(PROMPT)}


def test_step_with_kv_transfer_round_trips():
    from enginecore.protocol import (
        CachedReqs,
        KVBlockIO,
        KVTransferMeta,
        encode,
        worker_input_decoder,
    )

    step = ExecuteStep(1, [], CachedReqs(), {}, kv_transfer=KVTransferMeta(
        loads=[KVBlockIO(3, "ab")], saves=[KVBlockIO(4, "cd")]))
    assert worker_input_decoder.decode(encode(step)) == step
    plain = ExecuteStep(2, [], CachedReqs(), {})
    assert worker_input_decoder.decode(encode(plain)).kv_transfer is None
