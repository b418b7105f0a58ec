"""MoE models (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers, fp32 on CPU.

Logits through our loader and paged model path (`PagedBatcher`, as the runner drives it) and
greedy tokens through the whole engine (offline `LLM`) on tiny random checkpoints written by
transformers itself, so the per-expert on-disk layout and both config spellings are exercised.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_parity import PagedBatcher, hf_logits, prompt
from transformers import AutoModelForCausalLM

from frontend import LLM, SamplingParams
from workers.demo import build_tiny_checkpoint
from workers.models import load_model
from workers.models.qwen3_moe import MoeArgs, SparseMoeBlock

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")
ATOL = 1e-4


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: build_tiny_checkpoint(root / arch, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def hf_moe(moe_models: dict[str, str]) -> dict[str, torch.nn.Module]:
    return {arch: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for arch, path in moe_models.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_through_prefill_chunks_and_decode(arch: str, moe_models: dict,
                                                        hf_moe: dict) -> None:
    hf = hf_moe[arch]
    model = load_model(moe_models[arch], torch.float32, "cpu")
    assert any(isinstance(m, SparseMoeBlock) for m in model.modules())
    batcher = PagedBatcher(model, seed=1)
    a, b = prompt(9, seed=21), prompt(13, seed=22)
    # Varlen batch: a whole, b's first chunk; then b's rest next to a's first decode token.
    logits = batcher.step([("a", a), ("b", b[:5])])
    torch.testing.assert_close(logits[:9], hf_logits(hf, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[9:], hf_logits(hf, b)[:5], atol=ATOL, rtol=0)
    generated = [int(logits[8].argmax())]
    logits = batcher.step([("a", generated[-1:]), ("b", b[5:])])
    torch.testing.assert_close(logits[0], hf_logits(hf, a + generated)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], hf_logits(hf, b)[5:], atol=ATOL, rtol=0)
    for _ in range(4):
        generated.append(int(logits[0].argmax()))
        logits = batcher.step([("a", generated[-1:])])
        torch.testing.assert_close(logits[0], hf_logits(hf, a + generated)[-1], atol=ATOL,
                                   rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_through_engine_matches_transformers(arch: str, moe_models: dict,
                                                    hf_moe: dict) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 1000) for _ in range(rng.randint(3, 40))] for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    # Chunked prefill too. Expert parallelism with one rank is accepted and changes nothing.
    with LLM(moe_models[arch], max_num_batched_tokens=32,
             enable_expert_parallel=arch == "mixtral") as llm:
        assert llm.config.parallel.enable_expert_parallel == (arch == "mixtral")
        outs = llm.generate(prompts, params, use_tqdm=False)
    for tokens, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([tokens])
        with torch.inference_mode():
            want = hf_moe[arch].generate(ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=10, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, len(tokens):].tolist()
        assert out.outputs[0].token_ids == want, tokens
    assert len({t for out in outs for t in out.outputs[0].token_ids}) > 4


def test_config_spellings_and_sparse_layers() -> None:
    base = {"num_hidden_layers": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    qwen = MoeArgs.from_hf({**base, "num_local_experts": 6, "decoder_sparse_step": 2,
                            "mlp_only_layers": [3]}, mixtral=False)
    assert qwen.num_experts == 6 and qwen.sparse_layers == (False, True, False, False)
    assert not qwen.renormalize and qwen.shared_intermediate_size == 0
    hub = MoeArgs.from_hf({**base, "num_experts": 6, "norm_topk_prob": True,
                           "shared_expert_intermediate_size": 16}, mixtral=False)
    assert hub.num_experts == 6 and hub.renormalize and hub.shared_intermediate_size == 16
    assert hub.sparse_layers == (True,) * 4
    mixtral = MoeArgs.from_hf({**base, "num_local_experts": 8, "intermediate_size": 32},
                              mixtral=True)
    assert (mixtral.num_experts, mixtral.intermediate_size, mixtral.renormalize) == (8, 32, True)


def _without(src: str, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors.pop(name)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("arch,name,message", [
    ("qwen3_moe", "model.layers.1.mlp.experts.5.up_proj.weight",
     r"model\.layers\.1\.mlp\.experts\.w13_weight \['\(5, 1\)'\]"),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.2.w2.weight",
     r"model\.layers\.0\.mlp\.experts\.w2_weight \['\(2, None\)'\]")])
def test_missing_expert_tensor_is_an_error(arch: str, name: str, message: str,
                                           moe_models: dict, tmp_path: Path) -> None:
    path = _without(moe_models[arch], tmp_path / "m", name)
    with pytest.raises(KeyError, match=message):
        load_model(path, torch.float32, "cpu")


def test_dummy_load_of_config_only_checkpoint(moe_models: dict, tmp_path: Path) -> None:
    cfg = json.loads((Path(moe_models["qwen2_moe"]) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model(tmp_path, torch.float32, "cpu", load_format="dummy")
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_weight.shape == (4, 64, 64) and experts.w13_weight.abs().max() <= 1e-3
