"""Sleep mode through the whole engine on CPU: the state machine, requests that arrive while
asleep, level-2 reload, and identical outputs after waking."""

from __future__ import annotations

import threading
import time

import pytest

from frontend import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# A fixed small KV cache: on a GPU, several engines of this module share the card.
SMALL_KV = {"kv_cache_memory_bytes": 64 << 20}


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(tiny_model_dir, max_num_seqs=4, enable_sleep_mode=True, **SMALL_KV) as llm:
        yield llm


def test_level1_offload_then_wake_gives_identical_outputs(llm):
    before = tokens(llm)
    assert not llm.is_sleeping()
    llm.sleep(level=1)
    assert llm.is_sleeping()
    llm.wake_up(tags=["weights"])
    assert llm.is_sleeping()  # true until every part is awake
    llm.wake_up(tags=["kv_cache"])
    assert not llm.is_sleeping()
    assert tokens(llm) == before


def test_requests_arriving_while_asleep_wait_for_wake_up(llm):
    before = tokens(llm)
    llm.sleep(level=1)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(tokens(llm)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive() and not got  # queued, not run, not failed
    llm.wake_up()
    worker.join(timeout=60)
    assert got == [before]


def test_level2_discards_weights_until_reload(llm):
    before = tokens(llm)
    llm.sleep(level=2)
    llm.wake_up()
    assert tokens(llm) != before  # zeroed weights: the discarded ones really are gone
    llm.reload_weights()
    assert tokens(llm) == before


def test_bad_calls_are_errors_not_crashes(llm):
    with pytest.raises(ValueError, match="level"):
        llm.sleep(level=3)
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(tags=["gpu"])
    llm.sleep(level=1)
    with pytest.raises(ValueError, match="already asleep"):
        llm.sleep(level=1)
    with pytest.raises(ValueError, match="asleep"):
        llm.reload_weights()
    llm.wake_up()
    with pytest.raises(ValueError):
        llm.reload_weights("/nonexistent/checkpoint")
    assert len(tokens(llm)) == len(PROMPTS)  # the engine survived all of it


def test_sleep_needs_the_flag(tiny_model_dir):
    with LLM(tiny_model_dir, max_num_seqs=2, **SMALL_KV) as plain:
        with pytest.raises(ValueError, match="enable-sleep-mode"):
            plain.sleep()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_sleep_releases_device_memory(tiny_model_dir):
    """GPU: the worker's device memory really goes (mem_get_info is device-wide, so this
    process sees the worker's usage), and outputs after waking are identical."""
    import torch

    total = torch.cuda.mem_get_info()[1]
    kv_bytes = int(0.3 * total)
    with LLM(tiny_model_dir, enable_sleep_mode=True, kv_cache_memory_bytes=kv_bytes) as llm:
        before = tokens(llm)
        awake_free = torch.cuda.mem_get_info()[0]
        llm.sleep(level=1)
        asleep_free = torch.cuda.mem_get_info()[0]
        # The KV cache took 30% of the card: nearly all of it must come back.
        assert asleep_free - awake_free > 0.9 * kv_bytes, (awake_free, asleep_free)
        llm.wake_up()
        assert torch.cuda.mem_get_info()[0] < asleep_free - 0.9 * kv_bytes
        assert tokens(llm) == before
