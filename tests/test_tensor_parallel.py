"""Tensor and expert parallelism on CPU: 2 worker processes over gloo, through the real engine.

Each case starts an offline `LLM` with tensor_parallel_size=2 on a tiny random checkpoint and
checks greedy tokens against transformers' `generate` and the engine's logprobs (which rank 0
computes from the gathered logits) against transformers' log-softmax. TP=1 is pinned to
transformers by tests/test_engine.py and tests/test_moe_parity.py, so equal tokens here are equal
tokens across TP sizes. Cases: Qwen3 (q/k norm, tied embeddings, even kv-head split Hkv=2),
Llama with kv-head replication (Hkv=1), row-parallel biases and a vocab (1003) that does not
split evenly (padded LM-head/embedding shard), Qwen3-MoE in TP mode (sliced
experts), Qwen2-MoE in EP mode (whole experts per rank) with its tensor-parallel shared expert.
Process startup dominates: keep the case list short.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import kill_during_generate, worker_pids
from transformers import AutoModelForCausalLM

from frontend import LLM, EngineDeadError, SamplingParams
from sampling.params import StructuredOutputsParams
from workers.demo import build_tiny_checkpoint

MAX_NEW = 8
ATOL = 1e-4

# id -> (arch, checkpoint overrides, enable_expert_parallel)
CASES: dict[str, tuple[str, dict, bool]] = {
    "llama-kv1-bias-vocab1003": ("llama", {"num_key_value_heads": 1, "attention_bias": True,
                                            "mlp_bias": True}, False),
    "qwen3-qknorm-tied": ("qwen3", {}, False),
    "qwen3_moe-tp": ("qwen3_moe", {}, False),
    "qwen2_moe-shared-ep": ("qwen2_moe", {}, True),
}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 1000) for _ in range(rng.randint(3, 40))] for _ in range(3)]


def _grow_vocab_and_fill_biases(model_dir: str, extra: int) -> None:
    """Append `extra` random rows to the embedding and LM head (the tokenizer never emits them);
    make every bias random (transformers initializes them to zero, which hides bias bugs)."""
    path = f"{model_dir}/model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(extra)
    for name in [n for n in tensors if n.endswith(".bias")]:
        tensors[name] = torch.randn(tensors[name].shape, generator=gen) * 0.1
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.randn(extra, tensors[name].shape[1], generator=gen) * 0.1
        tensors[name] = torch.cat([tensors[name], rows])
    save_file(tensors, path, metadata={"format": "pt"})
    cfg = json.loads(open(f"{model_dir}/config.json").read())
    cfg["vocab_size"] += extra
    with open(f"{model_dir}/config.json", "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-models")
    paths = {case: build_tiny_checkpoint(root / case, arch=arch, **overrides)
             for case, (arch, overrides, _) in CASES.items()}
    _grow_vocab_and_fill_biases(paths["llama-kv1-bias-vocab1003"], 3)
    _grow_vocab_and_fill_biases(paths["qwen2_moe-shared-ep"], 0)  # q/k/v biases
    return paths


def _hf_reference(hf: torch.nn.Module, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax rows that chose them ([MAX_NEW, V])."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = hf(out).logits[0, len(prompt) - 1: -1].float()
    return out[0, len(prompt):].tolist(), torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_greedy_and_logprobs_match_transformers(case: str, checkpoints: dict) -> None:
    model_dir, ep = checkpoints[case], CASES[case][2]
    prompts = _prompts(seed=len(case))
    # detokenize off: the grown vocab's extra ids have no text.
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2,
                            detokenize=False)
    # A small token budget: prefills arrive in chunks, next to other requests' decodes.
    with LLM(model_dir, tensor_parallel_size=2, device="cpu", max_num_batched_tokens=32,
             enable_expert_parallel=ep) as llm:
        assert llm.config.parallel.tensor_parallel_size == 2
        outs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        want, ref = _hf_reference(hf, prompt)
        got = out.outputs[0]
        assert got.token_ids == want, prompt
        for i, (token, position) in enumerate(zip(got.token_ids, got.logprobs, strict=True)):
            assert position[token].rank == 1
            assert abs(position[token].logprob - ref[i, token].item()) < ATOL, (case, i)


def test_rank_0_grammar_and_seeds_then_killed_rank_1_fails_quickly(checkpoints: dict) -> None:
    # Rank 0 is then stuck in a collective that will never complete: the executor must notice
    # rank 1's death itself rather than wait for rank 0's answer.
    llm = LLM(checkpoints["qwen3-qknorm-tied"], tensor_parallel_size=2, device="cpu")
    try:
        # First, while healthy: a structured request (only rank 0 holds the grammar matcher)
        # next to a random one, then the same seeded request again.
        constrained = SamplingParams(temperature=1.0, seed=4, max_tokens=20, structured_outputs=
                                     StructuredOutputsParams(regex="(yes|no)[0-9]{2}"))
        free = SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
        first = llm.generate(["hello", "world"], [constrained, free], use_tqdm=False)
        assert re.fullmatch("(yes|no)[0-9]{2}", first[0].outputs[0].text), first[0].outputs[0]
        again = llm.generate(["world"], free, use_tqdm=False)
        assert again[0].outputs[0].token_ids == first[1].outputs[0].token_ids
        victim = worker_pids(llm.engine.core.proc.pid)[1]
        result, killed_at = kill_during_generate(
            llm, _prompts(seed=3),
            SamplingParams(temperature=0.0, max_tokens=5000, ignore_eos=True), victim, 15)
        assert isinstance(result.get("error"), EngineDeadError), result
        assert "worker 1" in str(result["error"])
        assert result["t"] - killed_at < 10.0
    finally:
        llm.shutdown()


def test_indivisible_heads_fail_with_a_clear_error(checkpoints: dict) -> None:
    # 4 query heads over 3 ranks: refused before any process starts, naming the field.
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) is not divisible"):
        LLM(checkpoints["llama-kv1-bias-vocab1003"], tensor_parallel_size=3, device="cpu")


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("case", ["qwen3-qknorm-tied", "llama-kv1-bias-vocab1003",
                                  "qwen3_moe-tp", "qwen2_moe-shared-ep"])
def test_tp2_on_gpus_matches_transformers(case: str, enforce_eager: bool,
                                          checkpoints: dict) -> None:
    # NCCL, Triton kernels, and (not eager) the all-reduces captured in decode CUDA graphs.
    model_dir, ep = checkpoints[case], CASES[case][2]
    prompts = _prompts(seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                            detokenize=False)
    with LLM(model_dir, tensor_parallel_size=2, device="cuda", dtype="float32",
             enforce_eager=enforce_eager, enable_expert_parallel=ep,
             kv_cache_memory_bytes=1 << 28) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_reference(hf, prompt)[0], (case, prompt)
