"""GPU end-to-end check: the engine on CUDA (Triton kernels, CUDA graphs) against transformers.

Builds the tiny random checkpoints, runs each through the offline `LLM` on the GPU in fp32 (eager
and with CUDA graphs, chunked prefill and preemption forced) and compares greedy tokens with
transformers' `generate` on the CPU. Also checks bf16 agreement rate. Exits non-zero on mismatch.

    python scripts/check_gpu_parity.py
    python scripts/check_gpu_parity.py --tensor-parallel-size 2
    python scripts/check_gpu_parity.py --tensor-parallel-size 2 --archs qwen3_moe mixtral \
        --enable-expert-parallel

With `--tensor-parallel-size N` every engine runs on N GPUs (NCCL); fp32 tokens must still equal
transformers'.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from frontend import LLM, SamplingParams
from workers.demo import build_tiny_checkpoint

MAX_NEW = 24


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--enable-expert-parallel", action="store_true")
    ap.add_argument("--archs", nargs="+", default=["llama", "qwen2", "qwen3"],
                    help="tiny checkpoint families (also qwen3_moe, qwen2_moe, mixtral)")
    args = ap.parse_args()
    parallel = dict(tensor_parallel_size=args.tensor_parallel_size,
                    enable_expert_parallel=args.enable_expert_parallel)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 1000) for _ in range(rng.randint(3, 300))] for _ in range(24)]
    root = tempfile.mkdtemp()
    failures = 0
    for arch in args.archs:
        path = build_tiny_checkpoint(f"{root}/{arch}", arch=arch)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            want = [hf_greedy(hf, p) for p in prompts]
        variants = {
            "fp32 graphs": dict(dtype="float32"),
            "fp32 eager": dict(dtype="float32", enforce_eager=True),
            "fp32 chunked+preempt": dict(dtype="float32", max_num_batched_tokens=64,
                                         num_gpu_blocks_override=64),
            "bf16 graphs": dict(dtype="bfloat16"),
        }
        for name, kwargs in variants.items():
            with LLM(path, device="cuda", kv_cache_memory_bytes=1 << 30, **parallel,
                     **kwargs) as llm:
                outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW),
                                    use_tqdm=False)
            got = [o.outputs[0].token_ids for o in outs]
            same = sum(g == w for g, w in zip(got, want, strict=True))
            tokens = sum(a == b for g, w in zip(got, want, strict=True)
                         for a, b in zip(g, w, strict=False))
            print(f"tp={args.tensor_parallel_size} {arch:9s} {name:22s} "
                  f"sequences equal {same}/{len(prompts)}, "
                  f"tokens equal {tokens}/{len(prompts) * MAX_NEW}")
            if name.startswith("fp32") and same != len(prompts):
                failures += 1
    print("FAIL" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
