"""Scheduler side of speculative decoding, driven step by step with hand-written results."""

from __future__ import annotations

import pytest

from enginecore.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from enginecore.protocol import AddRequest, StepResult
from enginecore.scheduler import Scheduler
from sampling.params import SamplingParams

EOS = 2


def make(method: str = "ngram", k: int = 3, num_blocks: int = 64, block_size: int = 4,
         budget: int = 64, max_model_len: int = 256) -> Scheduler:
    cfg = EngineConfig(
        model=ModelConfig(model="x", max_model_len=max_model_len, vocab_size=100,
                          eos_token_ids=[EOS]),
        cache=CacheConfig(block_size=block_size),
        scheduler=SchedulerConfig(async_scheduling=False, max_num_batched_tokens=budget),
        speculative=SpeculativeConfig(method=method, num_speculative_tokens=k,
                                      model=None if method == "ngram" else "d"))
    cfg.validate()
    return Scheduler(cfg, num_blocks)


def add(sched: Scheduler, req_id: str, prompt: list[int], max_tokens: int = 20) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    assert sched.add_request(AddRequest(req_id, prompt, params)) is None


def run(sched: Scheduler, tokens: dict[str, list[int]], drafts: dict[str, list[int]]):
    """Schedule one step and answer it with `tokens` per request (last = the sampled one)."""
    step = sched.schedule()
    ids = list(tokens)
    result = StepResult(step.step_id, ids, [tokens[r][-1] for r in ids],
                        spec_token_ids=[tokens[r] for r in ids],
                        draft_token_ids=[drafts.get(r, []) for r in ids])
    return step, sched.update(step, result)


def test_drafts_are_scheduled_verified_and_rolled_back():
    sched = make()
    add(sched, "a", [10, 11, 12, 13, 14])
    step, deltas = run(sched, {"a": [20]}, {"a": [21, 22, 23]})
    assert step.num_scheduled_tokens == {"a": 5} and not step.scheduled_spec_tokens
    assert deltas[0].new_token_ids == [20]
    req = sched.requests["a"]
    assert req.spec_token_ids == [21, 22, 23]

    # 1 + 3 tokens; the workers accept 2 drafts and sample 30 after them.
    step, deltas = run(sched, {"a": [21, 22, 30]}, {"a": [31, 32, 33]})
    assert step.num_scheduled_tokens == {"a": 4}
    assert step.scheduled_spec_tokens == {"a": [21, 22, 23]}
    assert deltas[0].new_token_ids == [21, 22, 30]
    # Verified: prompt (5) + 20, 21, 22; the rejected draft's slot is recomputed.
    assert req.num_computed_tokens == 8 and req.num_tokens == 9
    assert step.cached.num_computed_tokens == [5]
    step, _ = run(sched, {"a": [40]}, {})
    assert step.cached.num_computed_tokens == [8] and step.num_scheduled_tokens == {"a": 4}
    stats = sched.stats()
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens,
            stats.spec_num_accepted_tokens) == (2, 6, 2)
    assert stats.spec_accepted_per_pos == [1, 1, 0]


def test_drafts_capped_by_max_tokens_and_stop_mid_step():
    sched = make()
    add(sched, "a", [10, 11, 12], max_tokens=3)
    run(sched, {"a": [20]}, {"a": [21, 22, 23]})
    # Two outputs left: one draft at most, plus the sampled token.
    step, deltas = run(sched, {"a": [21, 25]}, {"a": [1, 1]})
    assert step.scheduled_spec_tokens == {"a": [21]}
    assert deltas[0].new_token_ids == [21, 25] and deltas[0].finish_reason == "length"
    assert not sched.requests

    add(sched, "b", [10, 11, 12], max_tokens=10)
    run(sched, {"b": [20]}, {"b": [EOS, 5, 6]})
    step, deltas = run(sched, {"b": [EOS, 5, 7]}, {})
    # EOS accepted as a draft ends the request: the tokens after it are dropped.
    assert deltas[0].new_token_ids == [EOS] and deltas[0].finish_reason == "stop"
    assert sched.kv.num_free_blocks == sched.kv.num_total_blocks


def test_drafts_count_in_budget_and_lookahead_blocks():
    sched = make(method="draft_model", k=3, budget=6, block_size=4)
    add(sched, "a", [1, 2, 3])
    add(sched, "b", [4, 5, 6])
    run(sched, {"a": [7], "b": [8]}, {"a": [9, 9, 9], "b": [9, 9, 9]})
    step, _ = run(sched, {"a": [9, 9, 9, 10], "b": [9, 11]}, {})
    # 6 tokens: a gets 1 + 3, b only 1 + 1 of its drafts.
    assert step.num_scheduled_tokens == {"a": 4, "b": 2}
    assert step.scheduled_spec_tokens == {"a": [9, 9, 9], "b": [9]}
    # a: 3 computed + 4 scheduled + 3 lookahead = 10 tokens -> 3 blocks of 4.
    assert len(sched.kv.block_ids("a")) == 3


@pytest.mark.parametrize("bad", [
    {"method": "nope", "num_speculative_tokens": 2},
    {"method": "ngram", "num_speculative_tokens": 0},
    {"method": "eagle", "num_speculative_tokens": 2},
    {"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
    {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
     "prompt_lookup_max": 2},
    {"method": "ngram", "num_speculative_tokens": 2, "bogus": 1},
    {"method": "eagle3", "num_speculative_tokens": 2},  # no head directory
    {"method": "mtp", "num_speculative_tokens": 2},  # the tiny model has no MTP layers
    {"method": "mtp", "num_speculative_tokens": 2, "model": "/elsewhere"},
])
def test_bad_speculative_config_names_the_field(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="speculative_config"):
        EngineConfig.create(tiny_model_dir, speculative_config=bad)


def test_speculative_config_turns_async_scheduling_off(tiny_model_dir):
    cfg = EngineConfig.create(tiny_model_dir,
                              speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    assert cfg.speculative.enabled and not cfg.scheduler.async_scheduling
    cfg = EngineConfig.create(tiny_model_dir, speculative_config={"model": tiny_model_dir,
                                                                  "num_speculative_tokens": 2})
    assert cfg.speculative.method == "draft_model"
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig.create(tiny_model_dir, async_scheduling=True,
                            speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_cli_flags_build_the_speculative_config(tiny_model_dir):
    from frontend.cli import parse_serve_args

    _, kwargs, _ = parse_serve_args([tiny_model_dir, "--speculative-config",
                                     '{"method": "ngram", "num_speculative_tokens": 4}'])
    cfg = EngineConfig.create(tiny_model_dir, **kwargs)
    assert (cfg.speculative.method, cfg.speculative.num_speculative_tokens) == ("ngram", 4)
    # The deprecated separate flags still work.
    _, kwargs, _ = parse_serve_args([tiny_model_dir, "--speculative-model", tiny_model_dir,
                                     "--num-speculative-tokens", "2"])
    cfg = EngineConfig.create(tiny_model_dir, **kwargs)
    assert cfg.speculative.method == "draft_model" and cfg.speculative.model == tiny_model_dir
