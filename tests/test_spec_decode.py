"""Speculative decoding end to end (real engine-core and worker processes, tiny CPU models).

Greedy outputs must be identical to transformers' greedy generate for every method, whether the
drafts are good (self-draft: every draft accepted) or bad (an unrelated model); sampling with
drafts must keep the target distribution (chi-square).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from frontend import LLM, SamplingParams
from sampling.params import StructuredOutputsParams

MAX_NEW = 12


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):  # a repeated chunk gives the n-gram drafter something to find
        chunk = [rng.randrange(5, 1000) for _ in range(rng.randint(3, 8))]
        out.append((chunk * 4)[: rng.randint(8, 30)] + [rng.randrange(5, 1000)])
    return out


_HF: dict[str, torch.nn.Module] = {}


def hf_model(model_dir: str) -> torch.nn.Module:
    if model_dir not in _HF:
        _HF[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir,
                                                              dtype=torch.float32).eval()
    return _HF[model_dir]


def hf_greedy(model_dir: str, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model(model_dir).generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_eagle_head(target_dir: str, out: Path) -> str:
    """A random EAGLE-1 head in the EAGLE checkpoint layout, sized for `target_dir`."""
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gen = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    tensors = {
        "fc.weight": w(h, 2 * h),
        "layers.0.self_attn.q_proj.weight": w(heads * d, h),
        "layers.0.self_attn.k_proj.weight": w(kv * d, h),
        "layers.0.self_attn.v_proj.weight": w(kv * d, h),
        "layers.0.self_attn.o_proj.weight": w(h, heads * d),
        "layers.0.mlp.gate_proj.weight": w(inter, h),
        "layers.0.mlp.up_proj.weight": w(inter, h),
        "layers.0.mlp.down_proj.weight": w(h, inter),
        "layers.0.post_attention_layernorm.weight": torch.ones(h),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    head_cfg = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                    "num_attention_heads", "num_key_value_heads", "head_dim",
                                    "rms_norm_eps", "max_position_embeddings")}
    head_cfg.update(architectures=["LlamaForCausalLM"], num_hidden_layers=1,
                    rope_theta=cfg.get("rope_theta", 10000.0))
    (out / "config.json").write_text(json.dumps(head_cfg))
    return str(out)


def drafts_for(method: str, tiny_models: dict[str, str], tmp_path: Path) -> dict:
    target = tiny_models["qwen3"]
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    if method == "self":
        return {"method": "draft_model", "model": target, "num_speculative_tokens": 3}
    if method == "unrelated":
        return {"method": "draft_model", "model": tiny_models["llama"],
                "num_speculative_tokens": 2}
    return {"method": "eagle", "model": make_eagle_head(target, tmp_path / "eagle"),
            "num_speculative_tokens": 3}


@pytest.mark.parametrize("method", ["ngram", "self", "unrelated", "eagle"])
def test_greedy_identical_to_no_speculation(tiny_models, tmp_path, method):
    target = tiny_models["qwen3"]
    spec = drafts_for(method, tiny_models, tmp_path)
    batch = prompts(4, seed=1)
    # Small blocks and budget: drafts cross block boundaries, steps mix prefill chunks with
    # verification; the second round hits the prefix cache.
    with LLM(target, speculative_config=spec, block_size=4, max_num_batched_tokens=48,
             max_num_seqs=4) as llm:
        for _ in range(2):
            outs = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
                                use_tqdm=False)
            for prompt, out in zip(batch, outs, strict=True):
                assert out.outputs[0].token_ids == hf_greedy(target, prompt), (method, prompt)
        stats = llm.get_stats()
    assert stats.prefix_cache_hits > 0
    assert stats.spec_num_drafts > 0 and stats.spec_num_draft_tokens >= stats.spec_num_drafts
    if method == "self":  # the draft is the target: every draft is its greedy choice
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
        assert stats.spec_accepted_per_pos[0] == stats.spec_num_drafts
    assert sum(stats.spec_accepted_per_pos) == stats.spec_num_accepted_tokens


def test_stops_and_fallback_requests(tiny_models):
    target = tiny_models["qwen3"]
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 4}
    prompt = prompts(1, seed=5)[0]
    ref = hf_greedy(target, prompt, 12)
    with LLM(target, speculative_config=spec) as llm:
        # max_tokens is never overrun although drafts run ahead; a stop token mid-draft ends
        # the output exactly there.
        for max_tokens in (1, 2, 5, 7):
            out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens),
                               use_tqdm=False)[0].outputs[0]
            assert out.token_ids == ref[:max_tokens] and out.finish_reason == "length"
        stop = ref[6]
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                    stop_token_ids=[stop]),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref[: ref.index(stop) + 1] and out.finish_reason == "stop"
        # Penalties take no drafts (non-spec decoding for that request) and stay exact.
        before = llm.get_stats().spec_num_drafts
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6,
                                                    repetition_penalty=1.0, min_tokens=2),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref[:6]
        assert llm.get_stats().spec_num_drafts == before


def test_structured_outputs_verify_grammar_valid_drafts(tiny_models):
    # The n-gram drafter finds the choices in the prompt; drafts are cut to what the grammar
    # accepts and verified under the grammar's masks: same text as without speculation.
    target = tiny_models["qwen3"]
    choices = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps all day long"]
    prompt = "say the quick brown fox jumps over the lazy dog or a lazy dog sleeps all day long"
    so = StructuredOutputsParams(choice=choices)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so)
    with LLM(target) as llm:
        ref = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].text
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2}
    with LLM(target, speculative_config=spec) as llm:
        assert llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].text == ref
        sampled = llm.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=40,
                                                            structured_outputs=so),
                               use_tqdm=False)
        stats = llm.get_stats()
    assert ref in choices and all(o.outputs[0].text in choices for o in sampled)
    assert stats.spec_num_accepted_tokens > 0


def test_sampling_keeps_the_target_distribution(tiny_models):
    # Joint distribution of the first two sampled tokens under top_k=3, through the whole
    # engine: the second comes out of the rejection sampler (self-draft: a greedy draft accepted
    # with probability p(draft), else a token from the residual). Chi-square against
    # transformers' exact probabilities; the threshold sits at a p-value of about 1e-5 for 8
    # degrees of freedom. (tests/test_spec_verify.py checks the same with many more samples.)
    target = tiny_models["qwen3"]
    prompt = prompts(1, seed=7)[0]
    model = hf_model(target)
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        top1 = torch.topk(first, 3)
        p1 = top1.values / top1.values.sum()
        expected: dict[tuple[int, int], float] = {}
        for t1, q1 in zip(top1.indices.tolist(), p1.tolist(), strict=True):
            second = torch.softmax(model(torch.tensor([prompt + [t1]])).logits[0, -1], -1)
            top2 = torch.topk(second, 3)
            for t2, q2 in zip(top2.indices.tolist(), (top2.values / top2.values.sum()).tolist(),
                              strict=True):
                expected[(t1, t2)] = q1 * q2
    n = 300
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 2}
    with LLM(target, speculative_config=spec, max_num_seqs=n) as llm:
        outs = llm.generate([prompt] * n, SamplingParams(temperature=1.0, top_k=3, max_tokens=3),
                            use_tqdm=False)
        stats = llm.get_stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # both paths ran
    counts: dict[tuple[int, int], int] = {}
    for out in outs:
        key = tuple(out.outputs[0].token_ids[:2])
        assert key in expected, key  # outside the top-k support: never
        counts[key] = counts.get(key, 0) + 1
    chi2 = sum((counts.get(key, 0) - n * p) ** 2 / (n * p) for key, p in expected.items())
    assert chi2 < 37.0, (chi2, counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speculation_matches_plain_decoding(tiny_models, tmp_path):
    # On the GPU: Triton attention, CUDA graphs for plain decode steps, the Triton rejection
    # kernel for sampled rows. fp32, so greedy output must not change with speculation.
    target = tiny_models["qwen3"]
    batch = prompts(8, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    engine = dict(device="cuda", dtype="float32", block_size=16)
    with LLM(target, **engine) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(batch, greedy, use_tqdm=False)]
    for method in ("ngram", "self", "eagle"):
        spec = drafts_for(method, tiny_models, tmp_path)
        with LLM(target, speculative_config=spec, **engine) as llm:
            outs = llm.generate(batch, greedy, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == ref, method
            sampled = llm.generate(batch, SamplingParams(temperature=1.0, top_p=0.9,
                                                         max_tokens=24), use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == 24 or o.outputs[0].finish_reason == "stop"
                       for o in sampled)
            stats = llm.get_stats()
        assert stats.spec_num_drafts > 0, method
        if method == "self":
            assert stats.spec_num_accepted_tokens > 0
