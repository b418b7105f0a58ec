"""Every cross-process message round-trips through its decoder, and config through JSON."""

from __future__ import annotations

import msgspec
import pytest

from enginecore import protocol as p
from enginecore.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sampling.params import SamplingParams

PARAMS = SamplingParams(n=1, temperature=0.7, top_k=5, seed=3, stop=["x"], logit_bias={7: -2.5},
                        bad_words_token_ids=[[1, 2]], extra_args={"k": [1, "a"]})
LOGPROBS = p.TokenLogprobs(token_ids=[[5, 6]], logprobs=[[-0.1, -2.0]], ranks=[1])


@pytest.mark.parametrize("msg", [
    p.AddRequest("r1", [1, 2, 3], PARAMS, client_index=2, arrival_time=1.5, priority=-1,
                 cache_salt="s"),
    p.Abort(["a", "b"]),
    p.Control(call_id=4, op="reset_prefix_cache", client_index=1),
])
def test_core_inputs_round_trip(msg):
    assert p.core_input_decoder.decode(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    p.EngineOutputs(outputs=[p.TokenDelta("r", [4], logprobs=LOGPROBS, finish_reason="stop",
                                          stop_reason=9, num_cached_tokens=16)],
                    stats=p.SchedulerStats(num_running=1, kv_cache_usage=0.5), timestamp=2.0),
    p.EngineOutputs(control=p.ControlResult(call_id=1, ok=False, error="no")),
    p.EngineOutputs(engine_error="engine dead: worker 0 exited"),
    p.CoreReady(engine_pid=10, num_blocks=5, block_size=16, max_model_len=64, vocab_size=100),
])
def test_core_outputs_round_trip(msg):
    assert p.core_output_decoder.decode(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    p.ExecuteStep(step_id=3, new=[p.NewReq("a", [1, 2], PARAMS, [4, 5], 0, [9])],
                  cached=p.CachedReqs(["b"], [[7]], [12]), num_scheduled_tokens={"a": 2, "b": 1},
                  finished=["c"]),
    p.InitKVCache(call_id=1, num_blocks=10),
    p.ProfileMemory(call_id=2),
    p.Shutdown(call_id=3),
])
def test_worker_inputs_round_trip(msg):
    assert p.worker_input_decoder.decode(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    p.StepResult(step_id=1, req_ids=["a"], sampled=[3], logprobs=[LOGPROBS],
                 prompt_logprobs={"a": LOGPROBS}, num_nans=0),
    p.MemoryReport(call_id=1, available_bytes=1 << 30, bytes_per_block=4096),
    p.ControlResult(call_id=2, value=5),
    p.WorkerError(message="boom"),
])
def test_worker_outputs_round_trip(msg):
    assert p.worker_output_decoder.decode(p.encode(msg)) == msg


def test_wrong_type_is_a_validation_error_not_a_crash():
    bad = msgspec.msgpack.encode(["add", "r1", "not-a-list", {}])
    with pytest.raises(msgspec.ValidationError):
        p.core_input_decoder.decode(bad)


def test_engine_config_json_round_trip_and_validation():
    cfg = EngineConfig(model=ModelConfig(model="m", max_model_len=64, vocab_size=10,
                                         eos_token_ids=[2]),
                       cache=CacheConfig(block_size=8), scheduler=SchedulerConfig(max_num_seqs=4))
    assert EngineConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="block_size"):
        msgspec.structs.replace(cfg, cache=CacheConfig(block_size=12)).validate()


def test_engine_config_create_reads_checkpoint(tiny_model_dir):
    cfg = EngineConfig.create(tiny_model_dir, max_num_seqs=8, block_size=32, policy="priority")
    assert cfg.scheduler.max_num_seqs == 8 and cfg.cache.block_size == 32
    assert cfg.scheduler.policy == "priority"
    assert cfg.model.architecture == "Qwen3ForCausalLM" and cfg.model.vocab_size == 1000
    assert cfg.model.eos_token_ids and cfg.model.max_model_len == 2048
    with pytest.raises(TypeError, match="unknown engine argument"):
        EngineConfig.create(tiny_model_dir, max_num_sequences=8)
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig.create(tiny_model_dir, max_model_len=10**6)
