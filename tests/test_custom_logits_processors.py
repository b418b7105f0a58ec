"""Custom logits processors and extra_args through the whole engine (offline LLM, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from frontend import LLM, SamplingParams

PLUGINS = str(Path(__file__).resolve().parent / "plugins")


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # The engine core and workers import the plug-ins by name: put them on their path.
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGINS, old) if p)
    import sys
    sys.path.insert(0, PLUGINS)
    from lp_plugins import BanOutputRepeatsAdapter  # a class object: offline only

    try:
        with LLM(tiny_model_dir, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
                 logits_processors=[
                "lp_plugins:TargetTokenLogitsProcessor", BanOutputRepeatsAdapter]) as llm:
            yield llm
    finally:
        os.environ["PYTHONPATH"] = old


def test_target_token_only_on_requests_that_ask(llm):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20, 21]]
    plain = SamplingParams(temperature=0.0, max_tokens=6)
    base = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    params = [SamplingParams(temperature=0.0, max_tokens=6, extra_args={"target_token": 42}),
              plain,
              SamplingParams(temperature=0.8, max_tokens=6, seed=1,
                             extra_args={"target_token": 77}),
              plain]
    # More requests than max_num_seqs: rows are reused, removed and moved while others run.
    outs = llm.generate(prompts + prompts[1:2], params + [plain], use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got[0] == [42] * 6 and got[2] == [77] * 6
    assert got[1] == base[1] and got[3] == base[3] and got[4] == base[1]


def test_adapter_processor_bans_repeats(llm):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                            extra_args={"no_repeat": True})
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [5, 6, 7]], [plain, params], use_tqdm=False)
    base, out = (o.outputs[0].token_ids for o in outs)
    assert len(set(base)) < 20  # the tiny model repeats itself without the processor
    assert len(out) == 20 and len(set(out)) == 20


def test_bad_extra_args_rejected_before_running(llm):
    with pytest.raises(ValueError, match="target_token"):
        llm.generate([[5, 6]], SamplingParams(extra_args={"target_token": "x"}), use_tqdm=False)
