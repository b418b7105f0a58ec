"""Batch invariance (`batch_invariant=True` / TLS_BATCH_INVARIANT=1) on CPU: one prompt alone and
inside batches of many sizes and orders gives bitwise-identical tokens and logprobs, and the
batch-invariant linear kernel matches its reference."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from frontend import LLM, SamplingParams
from kernels.matmul import batch_invariant_linear, batch_invariant_linear_ref

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3,
                        prompt_logprobs=2)


def fingerprint(out) -> tuple:
    """Tokens plus every logprob float, exactly (no tolerance)."""
    comp = out.outputs[0]
    sampled = [sorted((t, lp.logprob, lp.rank) for t, lp in pos.items()) for pos in comp.logprobs]
    prompt = [None if pos is None else sorted((t, lp.logprob) for t, lp in pos.items())
              for pos in out.prompt_logprobs]
    return comp.token_ids, sampled, prompt


def test_same_prompt_alone_and_in_batches_is_bitwise_identical(tiny_model_dir):
    rng = random.Random(0)
    target = [rng.randrange(5, 1000) for _ in range(37)]
    # A small token budget: the target's prefill is chunked differently in every batch.
    with LLM(tiny_model_dir, batch_invariant=True, max_num_batched_tokens=48,
             max_num_seqs=16) as llm:
        assert llm.config.model.batch_invariant
        alone = fingerprint(llm.generate([target], PARAMS, use_tqdm=False)[0])
        for size in (2, 5, 9, 16):
            others = [[rng.randrange(5, 1000) for _ in range(rng.randint(3, 60))]
                      for _ in range(size - 1)]
            where = rng.randrange(size)
            prompts = others[:where] + [target] + others[where:]
            outs = llm.generate(prompts, PARAMS, use_tqdm=False)
            assert fingerprint(outs[where]) == alone, (size, where)


def test_env_var_turns_it_on(tiny_model_dir):
    code = ("from enginecore.config import EngineConfig; import sys; "
            "print(EngineConfig.create(sys.argv[1]).model.batch_invariant)")
    for value, want in (("1", "True"), ("0", "False")):
        env = {**os.environ, "TLS_BATCH_INVARIANT": value}
        out = subprocess.run([sys.executable, "-c", code, tiny_model_dir], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == want, json.dumps([value, out])


# CPU tensors run in the Triton interpreter, CUDA tensors compiled (TRITON_INTERPRET=0).
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else (
    "cuda" if torch.cuda.is_available() else None)


@pytest.mark.skipif(DEVICE is None, reason="needs the interpreter or a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_batch_invariant_linear_matches_ref_and_rows_ignore_the_batch(dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(19, 32, dtype=dtype, device=DEVICE)
    w = torch.randn(24, 32, dtype=dtype, device=DEVICE) / 5
    b = torch.randn(24, dtype=dtype, device=DEVICE) if bias else None
    ref = batch_invariant_linear_ref(x.float(), w.float(), None if b is None else b.float())
    got = batch_invariant_linear(x, w, b)  # Triton, interpreted on CPU (conftest)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 17)):  # a row's value ignores its batch
        assert torch.equal(batch_invariant_linear(x[rows], w, b), got[rows])
        assert torch.equal(batch_invariant_linear_ref(x[rows], w, b),
                           batch_invariant_linear_ref(x, w, b)[rows])


@pytest.mark.skipif(not torch.cuda.is_available() or DEVICE != "cuda", reason="needs CUDA")
def test_cuda_batch_invariant_linear_at_model_shapes():
    """bf16 [T, 1024] x [3072, 1024]: a row's output is bitwise the same for T = 1 .. 700."""
    torch.manual_seed(0)
    x = torch.randn(700, 1024, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(3072, 1024, dtype=torch.bfloat16, device="cuda") / 32
    full = batch_invariant_linear(x, w)
    for t in (1, 2, 7, 64, 129, 511):
        assert torch.equal(batch_invariant_linear(x[:t], w), full[:t]), t
        assert torch.equal(batch_invariant_linear(x[-t:], w), full[-t:]), t
    torch.testing.assert_close(full.float(), (x.float() @ w.float().T), atol=0.1, rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_invariance_bf16(tiny_model_dir):
    """GPU: bf16 weights, Triton kernels, CUDA graphs on; the same bitwise check."""
    rng = random.Random(1)
    target = [rng.randrange(5, 1000) for _ in range(300)]
    with LLM(tiny_model_dir, batch_invariant=True, dtype="bfloat16",
             max_num_batched_tokens=256, max_num_seqs=64) as llm:
        alone = fingerprint(llm.generate([target], PARAMS, use_tqdm=False)[0])
        for size in (3, 17, 64):
            others = [[rng.randrange(5, 1000) for _ in range(rng.randint(3, 400))]
                      for _ in range(size - 1)]
            outs = llm.generate([*others, target], PARAMS, use_tqdm=False)
            assert fingerprint(outs[-1]) == alone, size
