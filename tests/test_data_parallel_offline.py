"""Offline data parallel: `LLM(..., data_parallel_size=2)` starts two engine cores, each on its
own GPU slice (CUDA_VISIBLE_DEVICES), spreads requests over them and gives the tokens of one
engine. Runs on CPU (where the slices are set but unused) and on a machine with >= 2 GPUs:

    PYTHONPATH=src python -m pytest -q tests/test_data_parallel_offline.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from frontend import LLM
from sampling.params import SamplingParams

PROMPTS = [[(11 * i + 5 * j) % 900 + 20 for j in range(8 + 3 * i)] for i in range(12)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("data parallel on GPU needs 2 GPUs", allow_module_level=True)


def _env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_dp2_offline_matches_dp1_on_separate_gpu_slices(tiny_model_dir):
    # fp32 on GPU too: batches differ per rank, and bf16 rounding may depend on the batch.
    engine = {"num_gpu_blocks_override": 128, "max_model_len": 256, "dtype": "float32"}
    llm = LLM(tiny_model_dir, **engine)
    try:
        single = _generate(llm)
    finally:
        llm.shutdown()
    llm = LLM(tiny_model_dir, data_parallel_size=2, **engine)
    try:
        cores = llm.engine.cores
        assert [c.dp_rank for c in cores] == [0, 1]
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0,1").split(",")
        assert [_env(c.proc.pid).get("CUDA_VISIBLE_DEVICES") for c in cores] == visible[:2]
        assert _generate(llm) == single
        per_rank = llm.engine.stats_by_rank
        assert per_rank[0].prefix_cache_queries > 0 and per_rank[1].prefix_cache_queries > 0
        assert llm.get_stats().prefix_cache_queries == sum(
            s.prefix_cache_queries for s in per_rank.values())
    finally:
        llm.shutdown()
