"""Disaggregated prefill with the shared-memory KV connector, offline: a producer instance
computes prompts and saves their full blocks; a fresh consumer instance loads them instead of
computing them and must then produce exactly what one plain instance produces."""

from __future__ import annotations

import os

import pytest

from enginecore.config import EngineConfig
from frontend import LLM
from sampling.params import SamplingParams

BLOCK = 16
# fp32 on GPU too: the comparison must not hinge on bf16 rounding between kernel paths.
ENGINE = {"num_gpu_blocks_override": 64, "max_model_len": 512, "block_size": BLOCK,
          "dtype": "float32"}
PROMPTS = [[(7 * i + 3 * j) % 500 + 10 for j in range(40 + 13 * i)] for i in range(4)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _kv(role: str, path: str) -> dict:
    return {"kv_connector": "SharedMemoryConnector", "kv_role": role,
            "kv_connector_extra_config": {"shm_path": path}}


def _run(model: str, prompts, params, **kwargs):
    llm = LLM(model, **ENGINE, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.num_cached_tokens) for o in outs]
    finally:
        llm.shutdown()


def test_consumer_loads_producer_blocks_and_matches_one_instance(tiny_model_dir, tmp_path):
    store = str(tmp_path / "kv")
    reference = _run(tiny_model_dir, PROMPTS, GREEDY)
    # Prefill only, as pd_proxy does: one token.
    _run(tiny_model_dir, PROMPTS, SamplingParams(max_tokens=1, temperature=0.0),
         kv_transfer_config=_kv("kv_producer", store))
    files = [f for _, _, fs in os.walk(store) for f in fs]
    assert len(files) == sum(len(p) // BLOCK for p in PROMPTS)  # every full prompt block
    decoded = _run(tiny_model_dir, PROMPTS, GREEDY, kv_transfer_config=_kv("kv_consumer", store))
    assert [toks for toks, _ in decoded] == [toks for toks, _ in reference]
    # A fresh consumer computed none of the loaded blocks (never the last prompt token).
    assert [cached for _, cached in decoded] == [(len(p) - 1) // BLOCK * BLOCK for p in PROMPTS]
    assert all(cached == 0 for _, cached in reference)

    # Corrupt the store: a consumer that really uses the loaded KV must now answer otherwise
    # (so the equality above is not the consumer quietly recomputing).
    for root, _, names in os.walk(store):
        for name in names:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(os.urandom(size))
    corrupted = _run(tiny_model_dir, PROMPTS, GREEDY, kv_transfer_config=_kv("kv_consumer", store))
    assert [toks for toks, _ in corrupted] != [toks for toks, _ in reference]


@pytest.mark.parametrize("value, match", [
    ({"kv_connector": "Nope"}, "kv_connector"),
    ({"kv_connector": "NixlConnector", "side_channel_port": 70000}, "side_channel_port"),
    ({"kv_role": "kv_sideways"}, "kv_role"),
])
def test_bad_kv_transfer_config_names_the_field(tiny_model_dir, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.create(tiny_model_dir, kv_transfer_config=value)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig.create(tiny_model_dir, enable_prefix_caching=False,
                            kv_transfer_config={"kv_role": "kv_both"})
