"""The whole engine (real engine-core and worker processes, shm ring, ZMQ) against transformers.

Every test drives the offline `LLM` API; the reference is transformers' own `generate` / forward
on the same tiny random fp32 checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from frontend import LLM, EngineDeadError, SamplingParams

ARCHS = ("llama", "qwen2", "qwen3")
MAX_NEW = 12


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


_HF_CACHE: dict[tuple, list[int]] = {}


def hf_greedy(model_dir: str, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    key = (model_dir, tuple(prompt), max_new)
    if key not in _HF_CACHE:
        model = _hf_model(model_dir)
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
        _HF_CACHE[key] = out[0, len(prompt):].tolist()
    return _HF_CACHE[key]


_HF_MODELS: dict[str, torch.nn.Module] = {}


def _hf_model(model_dir: str):
    if model_dir not in _HF_MODELS:
        _HF_MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
    return _HF_MODELS[model_dir]


def greedy(max_tokens: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def check_greedy(llm: LLM, model_dir: str, prompts: list[list[int]]) -> None:
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt), prompt


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_single_and_batched_match_transformers(tiny_models, arch):
    model_dir = tiny_models[arch]
    prompts = random_prompts(6, seed=1)
    with LLM(model_dir) as llm:
        for prompt in prompts[:2]:  # one at a time
            check_greedy(llm, model_dir, [prompt])
        check_greedy(llm, model_dir, prompts)  # batched, mixed lengths


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_small_chunked_prefill(tiny_models, arch):
    model_dir = tiny_models[arch]
    prompts = random_prompts(5, seed=2, lo=20, hi=90)
    with LLM(model_dir, max_num_batched_tokens=16, max_num_seqs=4) as llm:
        check_greedy(llm, model_dir, prompts)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_forced_preemption(tiny_models, arch):
    model_dir = tiny_models[arch]
    prompts = random_prompts(6, seed=3, lo=30, hi=60)
    # 14 blocks of 16 tokens: each request needs up to 5, so six cannot run together.
    with LLM(model_dir, num_gpu_blocks_override=14) as llm:
        check_greedy(llm, model_dir, prompts)
        assert llm.get_stats().num_preemptions > 0
        assert llm.get_stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("arch", ["llama"])
def test_synchronous_scheduling_matches_transformers(tiny_models, arch):
    # --no-async-scheduling: one step at a time, with chunking and preemption forced.
    model_dir = tiny_models[arch]
    prompts = random_prompts(6, seed=9, lo=20, hi=60)
    with LLM(model_dir, async_scheduling=False, max_num_batched_tokens=32,
             num_gpu_blocks_override=14) as llm:
        check_greedy(llm, model_dir, prompts)
        assert llm.get_stats().num_preemptions > 0


def test_prefix_cache_hits_and_counters(tiny_models):
    model_dir = tiny_models["qwen3"]
    shared = random_prompts(1, seed=4, lo=40, hi=40)[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    with LLM(model_dir, block_size=16) as llm:
        (out1,) = llm.generate([first], greedy(), use_tqdm=False)
        before = llm.get_stats()
        (out2,) = llm.generate([second], greedy(), use_tqdm=False)
        after = llm.get_stats()
        assert out1.num_cached_tokens == 0
        assert out2.num_cached_tokens == 32  # two full blocks of the shared 40-token prefix
        assert after.prefix_cache_hits - before.prefix_cache_hits == 32
        assert after.prefix_cache_queries - before.prefix_cache_queries == len(second)
        assert out2.outputs[0].token_ids == hf_greedy(model_dir, second)
        # The same prompt again hits everything but the last partial block.
        (out3,) = llm.generate([second], greedy(), use_tqdm=False)
        assert out3.num_cached_tokens == 32 and out3.outputs[0].token_ids == \
            out2.outputs[0].token_ids
        assert llm.reset_prefix_cache()
        (out4,) = llm.generate([second], greedy(), use_tqdm=False)
        assert out4.num_cached_tokens == 0


def test_logprobs_match_transformers(tiny_models):
    model_dir = tiny_models["llama"]
    prompt = random_prompts(1, seed=5, lo=20, hi=20)[0]
    with LLM(model_dir) as llm:
        (out,) = llm.generate([prompt], greedy(6, logprobs=3, prompt_logprobs=2),
                              use_tqdm=False)
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        full = torch.tensor([prompt + tokens])
        ref = torch.log_softmax(_hf_model(model_dir)(full).logits[0].float(), dim=-1)
    for i, (tok, position) in enumerate(zip(tokens, out.outputs[0].logprobs, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert abs(position[tok].logprob - row[tok].item()) < 1e-4
        assert position[tok].rank == 1  # greedy picks the argmax
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(position)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        tok = prompt[p]
        assert abs(out.prompt_logprobs[p][tok].logprob - ref[p - 1, tok].item()) < 1e-4


def test_seeded_sampling_is_reproducible(tiny_models):
    model_dir = tiny_models["qwen3"]
    prompts = random_prompts(4, seed=6)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    with LLM(model_dir) as llm:
        alone = llm.generate([prompts[0]], params, use_tqdm=False)[0].outputs[0].token_ids
        batched = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
        reordered = llm.generate(prompts[::-1], params, use_tqdm=False)[-1].outputs[0].token_ids
        other = llm.generate([prompts[0]], SamplingParams(temperature=1.0, seed=99,
                                                          max_tokens=10), use_tqdm=False)
    assert alone == batched == reordered
    assert other[0].outputs[0].token_ids != alone


def test_n_stop_strings_and_min_tokens(tiny_models):
    model_dir = tiny_models["qwen3"]
    prompt = random_prompts(1, seed=7)[0]
    with LLM(model_dir) as llm:
        (out,) = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5,
                                                       max_tokens=8), use_tqdm=False)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1
        (full,) = llm.generate([prompt], greedy(), use_tqdm=False)
        text = full.outputs[0].text
        assert len(text) > 4
        stop = text[2:4]
        (cut,) = llm.generate([prompt], greedy(stop=[stop]), use_tqdm=False)
        assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
        assert cut.outputs[0].text == text[: text.index(stop)]
        (length,) = llm.generate([prompt], greedy(4), use_tqdm=False)
        assert length.outputs[0].finish_reason == "length"
        assert len(length.outputs[0].token_ids) == 4


def test_bad_input_raises_clear_errors(tiny_models):
    with LLM(tiny_models["qwen3"], max_model_len=64) as llm:
        with pytest.raises(ValueError, match="max_model_len"):
            llm.generate([[5] * 64], greedy(), use_tqdm=False)
        with pytest.raises(ValueError, match="top_p"):
            llm.generate(["hello"], SamplingParams(top_p=1.5), use_tqdm=False)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[5, 100000]], greedy(), use_tqdm=False)
        # The engine is still fine afterwards.
        (out,) = llm.generate(["hello"], greedy(3), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 3


def worker_pids(core_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes an engine core started."""
    with open(f"/proc/{core_pid}/task/{core_pid}/children") as f:
        children = [int(x) for x in f.read().split()]
    pids = {}
    for pid in children:  # skip helpers such as multiprocessing's resource tracker
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if b"workers" in argv:
            pids[int(argv[argv.index(b"--rank") + 1])] = pid
    return pids


def kill_during_generate(llm: LLM, prompts: list, params: SamplingParams, victim: int,
                         join_timeout: float) -> tuple[dict, float]:
    """Run a long generate in a thread, SIGKILL `victim` a second in, wait for the call to end.

    Returns ({"error": the exception raised, "t": when generate returned}, kill time); asserts
    the call did not hang."""
    result: dict = {}

    def run() -> None:
        try:
            llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - the caller inspects it
            result["error"] = exc
        result["t"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=join_timeout)
    assert not thread.is_alive(), "generate hung after a worker died"
    return result, killed_at


def test_killed_worker_fails_generate_quickly(tiny_models):
    llm = LLM(tiny_models["qwen3"])
    try:
        pids = worker_pids(llm.engine.core.proc.pid)
        assert list(pids) == [0]
        result, killed_at = kill_during_generate(
            llm, random_prompts(8, seed=8), greedy(2000, ignore_eos=True), pids[0], 10)
        assert isinstance(result.get("error"), EngineDeadError)
        assert "worker" in str(result["error"]) or "engine" in str(result["error"])
        assert result["t"] - killed_at < 5.0
    finally:
        llm.shutdown()
