"""Drafters built to be exact (tiny CPU models): their drafts must be accepted, and sampling
through them must keep the target's distribution.

The target is a bigram model (every o_proj / down_proj zero: the logits at i depend on token i
only); an MTP layer and an EAGLE-3 head are constructed to reproduce it one step ahead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_spec_decode import hf_model, prompts
from test_spec_eagle3_mtp import _run_greedy, add_mtp_layer

from frontend import LLM, SamplingParams


def make_bigram_mtp_target(target_dir: str, out: Path) -> str:
    """`add_mtp_layer`, then make the target a bigram model (every o_proj / down_proj zero:
    logits at i depend on token i only) and the MTP layer its exact copy one step ahead
    (eh_proj = [I | 0], its layer adds nothing, the target's final norm): its drafts are the
    target's greedy tokens, so most drafts are accepted."""
    path = Path(add_mtp_layer(target_dir, out))
    cfg = json.loads((path / "config.json").read_text())
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    tensors = load_file(str(path / "model.safetensors"))
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
    prefix = f"model.layers.{n}."
    tensors[f"{prefix}eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    tensors[f"{prefix}enorm.weight"] = torch.ones(h)
    tensors[f"{prefix}shared_head.norm.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)


def make_exact_eagle3_head(bigram_dir: str, out: Path) -> str:
    """An EAGLE-3 head that reproduces a bigram target one step ahead (first draft only), over
    the full vocabulary permuted (d2t non-trivial everywhere).

    fc = 0 with a tiny constant bias: g is the same small vector at every position, so q and k
    (read from hidden_norm(g) only) are one constant vector c per head, and attention sharply
    prefers the current position (RoPE: c . R(j - i) c peaks at j = i; |c|^2 / sqrt(D) large).
    v = the normed embedding of token_{i+1}, o_proj = I, the MLP adds nothing: h_out ~ that
    embedding, and norm + lm_head (the target's rows, permuted) give the bigram's next token.
    """
    cfg = json.loads((Path(bigram_dir) / "config.json").read_text())
    h, vocab, heads, d = cfg["hidden_size"], cfg["vocab_size"], 4, 16
    assert heads * d == h
    target = load_file(str(Path(bigram_dir) / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(h, generator=gen)
    n_u = u / u.pow(2).mean().sqrt()  # hidden_norm(g) for g = eps-free multiples of u
    c = torch.zeros(d)
    c[: d // 2] = 12.0  # every rope pair (j, j + D/2) rotates c by its own angle
    qk = torch.cat([torch.zeros(h, h), torch.outer(c.repeat(heads), n_u) / n_u.dot(n_u)], 1)
    perm = torch.randperm(vocab, generator=gen)
    tensors = {
        "fc.weight": torch.zeros(h, 2 * h), "fc.bias": 3e-3 * u,
        "norm.weight": target["model.norm.weight"].clone(),
        "lm_head.weight": target["lm_head.weight"][perm].clone(),
        "d2t": perm - torch.arange(vocab),
        "midlayer.input_layernorm.weight": torch.ones(h),
        "midlayer.hidden_norm.weight": torch.ones(h),
        "midlayer.post_attention_layernorm.weight": torch.ones(h),
        "midlayer.self_attn.q_proj.weight": qk, "midlayer.self_attn.k_proj.weight": qk.clone(),
        "midlayer.self_attn.v_proj.weight": torch.cat([torch.eye(h), torch.zeros(h, h)], 1),
        "midlayer.self_attn.o_proj.weight": torch.eye(h),
        "midlayer.mlp.gate_proj.weight": torch.zeros(cfg["intermediate_size"], h),
        "midlayer.mlp.up_proj.weight": torch.zeros(cfg["intermediate_size"], h),
        "midlayer.mlp.down_proj.weight": torch.zeros(h, cfg["intermediate_size"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": cfg["intermediate_size"], "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": d, "rms_norm_eps": cfg["rms_norm_eps"],
        "max_position_embeddings": 2048, "num_hidden_layers": 1, "rope_theta": 10000.0,
        "draft_vocab_size": vocab,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1]}}))
    return str(out)


@pytest.fixture(scope="module")
def bigram_target(tiny_models, tmp_path_factory) -> str:
    return make_bigram_mtp_target(tiny_models["llama"], tmp_path_factory.mktemp("bigram") / "t")


def _exact_spec(method: str, target: str, tmp_path) -> dict:
    """speculative_config of an exact MTP layer (k = 3) or an exact EAGLE-3 head (k = 1)."""
    if method == "mtp":
        return {"method": "mtp", "num_speculative_tokens": 3}
    head = make_exact_eagle3_head(target, tmp_path / "e3")
    return {"method": "eagle3", "model": head, "num_speculative_tokens": 1}


@pytest.mark.parametrize("method", ["mtp", "eagle3"])
def test_exact_drafters_are_accepted_and_keep_the_distribution(bigram_target, tmp_path, method):
    # Greedy: an exact MTP layer's k = 3 drafts (each fed the previous draft) and an exact
    # EAGLE-3 head's first draft (through d2t) are the target's own tokens. Sampling through
    # the EAGLE-3 head (top_k 3): the joint distribution of the first two tokens matches
    # transformers' (chi-square, 8 degrees of freedom, p ~ 1e-5 threshold) while drafts are
    # both accepted and rejected.
    spec = _exact_spec(method, bigram_target, tmp_path)
    stats = _run_greedy(bigram_target, spec, bigram_target)
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens
    if method == "mtp":
        return  # one sampling check is enough: drafter and rejection sampler are shared
    prompt = prompts(1, seed=7)[0]
    model = hf_model(bigram_target)
    expected: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        first = torch.topk(torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1), 3)
        for t1, q1 in zip(first.indices.tolist(), (first.values / first.values.sum()).tolist(),
                          strict=True):
            logits = model(torch.tensor([prompt + [t1]])).logits[0, -1]
            second = torch.topk(torch.softmax(logits, -1), 3)
            for t2, q2 in zip(second.indices.tolist(),
                              (second.values / second.values.sum()).tolist(), strict=True):
                expected[(t1, t2)] = q1 * q2
    n = 300
    with LLM(bigram_target, speculative_config={**spec, "num_speculative_tokens": 2},
             max_num_seqs=n) as llm:
        outs = llm.generate([prompt] * n, SamplingParams(temperature=1.0, top_k=3, max_tokens=3),
                            use_tqdm=False)
        stats = llm.get_stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    counts: dict[tuple[int, int], int] = {}
    for out in outs:
        key = tuple(out.outputs[0].token_ids[:2])
        assert key in expected, key
        counts[key] = counts.get(key, 0) + 1
    chi2 = sum((counts.get(key, 0) - n * p) ** 2 / (n * p) for key, p in expected.items())
    assert chi2 < 37.0, (chi2, counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["mtp", "eagle3"])
def test_gpu_exact_drafters_are_accepted(bigram_target, tmp_path, method):
    # The same on the GPU (Triton attention for the heads, CUDA graphs for plain steps), fp32.
    spec = _exact_spec(method, bigram_target, tmp_path)
    stats = _run_greedy(bigram_target, spec, bigram_target, device="cuda", dtype="float32",
                        block_size=16)
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens
