"""scripts/make_spec_pair.py: the benchmark's cheap draft with controlled acceptance.

A 4-layer target whose layers >= 1 write nothing into the residual stream and a 1-layer draft
(its first layer): transformers gives both the same greedy tokens, and through the engine every
draft is accepted while the output stays the target's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from test_spec_decode import hf_greedy, prompts

from frontend import LLM, SamplingParams

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_spec_pair.py"


def _make(config: Path, out: Path, noise: float = 0.0) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "--out", str(out),
                           "--draft-layers", "1", "--noise", str(noise), "--dtype", "float32",
                           "--init-std", "0.1"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_zeroed_target_accepts_every_draft(tiny_models, tmp_path):
    cfg = json.loads((Path(tiny_models["llama"]) / "config.json").read_text())
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    pair = _make(config, tmp_path / "pair")
    batch = prompts(3, seed=2)
    for prompt in batch:  # the oracle: transformers on both checkpoints
        assert hf_greedy(pair["target"], prompt) == hf_greedy(pair["draft"], prompt)
    spec = {"method": "draft_model", "model": pair["draft"], "num_speculative_tokens": 3}
    with LLM(pair["target"], speculative_config=spec, max_num_seqs=4) as llm:
        outs = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=12),
                            use_tqdm=False)
        stats = llm.get_stats()
    for prompt, out in zip(batch, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(pair["target"], prompt)
    assert stats.spec_num_draft_tokens > 0
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens

    noisy = _make(config, tmp_path / "noisy", noise=0.05)
    layer = load_file(str(Path(noisy["target"]) / "layer-003.safetensors"))
    o_proj = layer["model.layers.3.self_attn.o_proj.weight"]
    assert 0.04 < o_proj.std().item() < 0.06
    zero = load_file(str(Path(pair["target"]) / "layer-003.safetensors"))
    assert not zero["model.layers.3.mlp.down_proj.weight"].any()
    assert json.loads((Path(pair["draft"]) / "config.json").read_text())["num_hidden_layers"] == 1
