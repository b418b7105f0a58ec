"""EAGLE-3 and MTP drafters (tiny random weights, CPU).

The target's auxiliary hidden states against transformers' `output_hidden_states`; each head's
forward against a plain-torch reference of the EAGLE-3 / MTP step; greedy output through the
engine identical to transformers' (EAGLE-3 with a smaller draft vocabulary and a non-trivial
d2t; MTP with k = 1; k = 3 and sampling in test_spec_exact_drafters.py); bad checkpoints
refused with the tensor named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_spec_decode import MAX_NEW, hf_greedy, hf_model, prompts

from frontend import LLM, SamplingParams
from workers.attention import AttnMetadata, set_forward_context
from workers.demo import build_tiny_checkpoint
from workers.models import load_model
from workers.spec.eagle3 import Eagle3Llama, aux_layer_ids, load_eagle3
from workers.spec.mtp import load_mtp

DRAFT_VOCAB = 96


def _w(gen: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm(gen: torch.Generator, h: int) -> torch.Tensor:
    return 1.0 + _w(gen, h)  # not all ones: a swapped norm must show


def _layer(gen: torch.Generator, cfg: dict, prefix: str, in_features: int) -> dict:
    """One Llama decoder layer's tensors under `prefix`; q/k/v read `in_features`."""
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return {
        f"{prefix}self_attn.q_proj.weight": _w(gen, heads * d, in_features),
        f"{prefix}self_attn.k_proj.weight": _w(gen, kv * d, in_features),
        f"{prefix}self_attn.v_proj.weight": _w(gen, kv * d, in_features),
        f"{prefix}self_attn.o_proj.weight": _w(gen, h, heads * d),
        f"{prefix}mlp.gate_proj.weight": _w(gen, inter, h),
        f"{prefix}mlp.up_proj.weight": _w(gen, inter, h),
        f"{prefix}mlp.down_proj.weight": _w(gen, h, inter),
        f"{prefix}input_layernorm.weight": _norm(gen, h),
        f"{prefix}post_attention_layernorm.weight": _norm(gen, h),
    }


def make_eagle3_head(target_dir: str, out: Path, layer_ids: list[int] | None,
                     draft_vocab: int = DRAFT_VOCAB, drop: tuple[str, ...] = (),
                     fc_in: int | None = None) -> str:
    """A random EAGLE-3 head for `target_dir`: draft vocab = a random subset of the target's."""
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    kept = torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[kept] = True
    tensors = {"fc.weight": _w(gen, h, fc_in or 3 * h), "norm.weight": _norm(gen, h),
               "midlayer.hidden_norm.weight": _norm(gen, h),
               "lm_head.weight": _w(gen, draft_vocab, h, scale=0.5),
               "d2t": kept - torch.arange(draft_vocab), "t2d": t2d,
               **_layer(gen, cfg, "midlayer.", 2 * h)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(out / "model.safetensors"))
    head_cfg = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                    "num_attention_heads", "num_key_value_heads", "head_dim",
                                    "rms_norm_eps", "max_position_embeddings")}
    head_cfg.update(architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1,
                    draft_vocab_size=draft_vocab, rope_theta=10000.0)
    if layer_ids is not None:
        head_cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": layer_ids}
    (out / "config.json").write_text(json.dumps(head_cfg))
    return str(out)


def add_mtp_layer(target_dir: str, out: Path, own_head: bool = False) -> str:
    """A copy of `target_dir` with one MTP layer (DeepSeek-V3 naming) added to it."""
    shutil.copytree(target_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    gen = torch.Generator().manual_seed(2)
    prefix = f"model.layers.{n}."
    extra = {f"{prefix}enorm.weight": _norm(gen, h), f"{prefix}hnorm.weight": _norm(gen, h),
             f"{prefix}eh_proj.weight": _w(gen, h, 2 * h),
             f"{prefix}shared_head.norm.weight": _norm(gen, h), **_layer(gen, cfg, prefix, h)}
    if own_head:
        extra[f"{prefix}shared_head.head.weight"] = _w(gen, cfg["vocab_size"], h, scale=0.5)
    tensors = load_file(str(out / "model.safetensors"))
    save_file({**tensors, **extra}, str(out / "model.safetensors"))
    cfg["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def deep_model(request, tmp_path_factory) -> str:
    """A tiny model with 8 layers: default aux layer ids (2, 4, 5) are distinct."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("deep") / request.param,
                                 arch=request.param, num_hidden_layers=8)


def _prefill(model: torch.nn.Module, ids: list[int], *extra: torch.Tensor) -> torch.Tensor:
    """One sequence's prefill through `model` with a fresh 1-block-per-4 cache -> hidden."""
    block = 4
    shape = model.kv_cache_shape(-(-len(ids) // block) + 1, block)
    model.bind_kv_cache([torch.zeros(shape) for _ in range(model.num_layers)])
    n = len(ids)
    meta = AttnMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(1, -(-n // block) + 1, dtype=torch.int32)[None],
        slot_mapping=torch.arange(block, block + n), max_query_len=n, max_seq_len=n)
    with torch.inference_mode(), set_forward_context(meta):
        return model(torch.tensor(ids), torch.arange(n), *extra)


def test_aux_hidden_states_match_transformers(deep_model):
    target = load_model(deep_model)
    ids = prompts(1, seed=3)[0]
    plain = _prefill(target, ids)
    assert target.aux_hidden is None  # off: the plain forward keeps nothing
    layers = aux_layer_ids({"eagle_config": {}}, target.num_layers)
    assert layers == (2, 4, 5)
    target.enable_aux_hidden(layers)
    hidden = _prefill(target, ids)
    torch.testing.assert_close(hidden, plain)
    with torch.no_grad():
        ref = hf_model(deep_model)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([ref[i][0] for i in layers], dim=-1)
    torch.testing.assert_close(target.aux_hidden, expected, atol=1e-4, rtol=1e-4)
    target.enable_aux_hidden((0, 7))  # layer 0's input is the embedding
    _prefill(target, ids)
    torch.testing.assert_close(target.aux_hidden, torch.cat([ref[0][0], ref[7][0]], -1),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
        target.enable_aux_hidden((2, 8))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _inv_freq(model_dir: str | None, d: int) -> torch.Tensor:
    """Rotary inverse frequencies: transformers' for a checkpoint, else plain theta 1e4."""
    if model_dir is None:
        return 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d)
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    conf = AutoConfig.from_pretrained(model_dir)
    return ROPE_INIT_FUNCTIONS[conf.rope_parameters["rope_type"]](conf, "cpu")[0]


def _ref_layer(t: dict, p: str, x_in: torch.Tensor, residual: torch.Tensor, cfg: dict,
               inv: torch.Tensor) -> torch.Tensor:
    """Plain causal attention + MLP of one Llama layer; x_in is the (normed) attention input."""
    n, d = x_in.shape[0], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    q = (x_in @ t[p + "self_attn.q_proj.weight"].T).view(n, heads, d)
    k = (x_in @ t[p + "self_attn.k_proj.weight"].T).view(n, kv, d)
    v = (x_in @ t[p + "self_attn.v_proj.weight"].T).view(n, kv, d)
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rot(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    att = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    h = att.transpose(0, 1).reshape(n, -1) @ t[p + "self_attn.o_proj.weight"].T + residual
    m = _rms(h, t[p + "post_attention_layernorm.weight"])
    gate, up = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T + h


def test_eagle3_head_matches_reference_step(tiny_models, tmp_path):
    target_dir = tiny_models["llama"]
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    target = load_model(target_dir)
    for i, ids in enumerate(([0, 1, 1], None)):  # a repeated id; defaults past 2 layers
        head_dir = make_eagle3_head(target_dir, tmp_path / f"e3-{i}", layer_ids=ids)
        with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
            load_eagle3(head_dir, target, torch.float32, torch.device("cpu"))
    head_dir = make_eagle3_head(target_dir, tmp_path / "e3", layer_ids=[0, 1],
                                fc_in=2 * cfg["hidden_size"])
    t = load_file(str(Path(head_dir) / "model.safetensors"))
    head = load_eagle3(head_dir, target, torch.float32, torch.device("cpu"))
    assert isinstance(head, Eagle3Llama) and target.aux_layers == (0, 1)
    ids = prompts(1, seed=4)[0]
    aux = torch.randn(len(ids), 2 * cfg["hidden_size"], generator=torch.Generator().manual_seed(5))
    out = _prefill(head, ids, aux)
    # Reference: fc, two norms, attention over cat[embeds, hidden], MLP, final norm, d2t.
    g = aux @ t["fc.weight"].T
    embeds = target.model.embed_tokens.weight[torch.tensor(ids)]
    x = torch.cat([_rms(embeds, t["midlayer.input_layernorm.weight"]),
                   _rms(g, t["midlayer.hidden_norm.weight"])], -1)
    ref = _ref_layer(t, "midlayer.", x, g, cfg, _inv_freq(None, cfg["head_dim"]))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    logits = head.compute_logits(out)
    torch.testing.assert_close(logits, _rms(ref, t["norm.weight"]) @ t["lm_head.weight"].T,
                               atol=1e-4, rtol=1e-4)
    draft = logits.argmax(-1)
    mapped = head.to_target_ids(draft)
    assert (mapped == draft + t["d2t"][draft]).all() and (mapped != draft).any()
    assert t["t2d"][mapped].all()


def test_mtp_layer_matches_reference_step(tiny_models, tmp_path):
    target_dir = add_mtp_layer(tiny_models["llama"], tmp_path / "mtp", own_head=True)
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    target = load_model(target_dir)  # the target's loader skips model.layers.2.*
    head = load_mtp(target_dir, target, torch.float32, torch.device("cpu"))
    t = {k[len("model.layers.2."):]: v for k, v in
         load_file(str(Path(target_dir) / "model.safetensors")).items()
         if k.startswith("model.layers.2.")}
    ids = prompts(1, seed=6)[0]
    hidden = torch.randn(len(ids), cfg["hidden_size"], generator=torch.Generator().manual_seed(7))
    out = _prefill(head, ids, hidden)
    embeds = target.model.embed_tokens.weight[torch.tensor(ids)].clone()
    embeds[0] = 0.0  # position 0 is masked, as vLLM does
    h = torch.cat([_rms(embeds, t["enorm.weight"]), _rms(hidden, t["hnorm.weight"])], -1)
    h = h @ t["eh_proj.weight"].T
    ref = _ref_layer(t, "", _rms(h, t["input_layernorm.weight"]), h, cfg,
                     _inv_freq(target_dir, cfg["head_dim"]))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.compute_logits(out),
                               _rms(ref, t["shared_head.norm.weight"])
                               @ t["shared_head.head.weight"].T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        load_mtp(tiny_models["llama"], target, torch.float32, torch.device("cpu"))


def test_bad_eagle3_checkpoints_name_the_tensor(tiny_models, tmp_path):
    target_dir = tiny_models["llama"]
    h = json.loads((Path(target_dir) / "config.json").read_text())["hidden_size"]
    target = load_model(target_dir)
    cases = [(dict(drop=("d2t",)), "'d2t'"), (dict(fc_in=3 * h), "'fc.weight'"),
             (dict(drop=("fc.weight",)), "'fc.weight'"),
             (dict(drop=("midlayer.hidden_norm.weight",)), "midlayer.hidden_norm.weight")]
    for i, (kwargs, name) in enumerate(cases):
        head_dir = make_eagle3_head(target_dir, tmp_path / f"bad{i}", layer_ids=[0, 1], **{
            "fc_in": 2 * h, **kwargs})
        with pytest.raises((ValueError, KeyError), match=name):
            load_eagle3(head_dir, target, torch.float32, torch.device("cpu"))


def _run_greedy(target: str, spec: dict, reference: str, block_size: int = 4,
                **engine) -> object:
    batch = prompts(4, seed=1)
    with LLM(target, speculative_config=spec, block_size=block_size, max_num_batched_tokens=48,
             max_num_seqs=4, **engine) as llm:
        for _ in range(2):  # the second round hits the prefix cache
            outs = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
                                use_tqdm=False)
            for prompt, out in zip(batch, outs, strict=True):
                assert out.outputs[0].token_ids == hf_greedy(reference, prompt), prompt
        stats = llm.get_stats()
    assert stats.prefix_cache_hits > 0
    assert stats.spec_num_drafts > 0 and stats.spec_num_draft_tokens >= stats.spec_num_drafts
    assert sum(stats.spec_accepted_per_pos) == stats.spec_num_accepted_tokens
    return stats


def test_eagle3_greedy_identical_to_no_speculation(tiny_models, tmp_path):
    target = tiny_models["llama"]
    h = json.loads((Path(target) / "config.json").read_text())["hidden_size"]
    head = make_eagle3_head(target, tmp_path / "e3", layer_ids=[0, 1], fc_in=2 * h)
    _run_greedy(target, {"method": "eagle3", "model": head, "num_speculative_tokens": 3}, target)


def test_mtp_greedy_identical_to_no_speculation(tiny_models, tmp_path):
    # A random MTP layer with its own head, k = 1 (k = 3: the exact layer below).
    target = add_mtp_layer(tiny_models["llama"], tmp_path / "mtp", own_head=True)
    _run_greedy(target, {"method": "mtp", "num_speculative_tokens": 1}, tiny_models["llama"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_eagle3_and_mtp_match_plain_decoding(tiny_models, tmp_path):
    # On the GPU: Triton attention and CUDA graphs for plain decode steps, which must hand the
    # EAGLE-3 head the aux hidden states of the replayed graph. fp32: greedy output unchanged.
    target = add_mtp_layer(tiny_models["llama"], tmp_path / "mtp")
    h = json.loads((Path(target) / "config.json").read_text())["hidden_size"]
    head = make_eagle3_head(target, tmp_path / "e3", layer_ids=[0, 1], fc_in=2 * h)
    batch = prompts(8, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    # penalties: a fallback request decodes without drafts, so pure decode steps (graphs) occur
    mixed = [greedy] * 7 + [SamplingParams(temperature=0.0, max_tokens=24,
                                           repetition_penalty=1.0, min_tokens=2)]
    engine = dict(device="cuda", dtype="float32", block_size=16)
    with LLM(target, **engine) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(batch, greedy, use_tqdm=False)]
    for spec in ({"method": "eagle3", "model": head, "num_speculative_tokens": 3},
                 {"method": "mtp", "num_speculative_tokens": 2}):
        with LLM(target, speculative_config=spec, **engine) as llm:
            outs = llm.generate(batch, mixed, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == ref, spec["method"]
            stats = llm.get_stats()
        assert stats.spec_num_drafts > 0, spec["method"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_replay_sets_aux_hidden(tiny_models):
    # A decode step of 3 requests replayed from a captured graph leaves the same aux hidden
    # states in `model.aux_hidden` as the eager forward of that step.
    from workers.cudagraph import CudaGraphs
    from workers.inputs import InputBuffers

    dev = torch.device("cuda")
    model = load_model(tiny_models["llama"], torch.float32, dev)
    model.enable_aux_hidden((0, 1))
    block = 16
    shape = model.kv_cache_shape(16, block)
    model.bind_kv_cache([torch.randn(shape, device=dev) for _ in range(model.num_layers)])
    buf = InputBuffers(64, 8, 4, dev)
    graphs = CudaGraphs(model, buf, 8)
    graphs.capture()
    n, seq = 3, [5, 17, 30]
    buf.input_ids[:n] = [11, 22, 33]
    buf.positions[:n] = [s - 1 for s in seq]
    buf.query_start_loc[: n + 1] = range(n + 1)
    buf.seq_lens[:n] = seq
    buf.block_tables[:n, :2] = [[1, 2], [3, 4], [5, 6]]
    buf.slot_mapping[:n] = [buf.block_tables[r, (s - 1) // block] * block + (s - 1) % block
                            for r, s in enumerate(seq)]
    hidden = graphs.replay(n, 2, graphs.bucket(n)).clone()
    aux = model.aux_hidden.clone()
    assert aux.shape == (n, 2 * model.args.hidden_size)
    buf.copy_to_device(n, n, 2)
    with torch.inference_mode(), set_forward_context(buf.metadata(n, n, 2, 1, max(seq))):
        eager = model(buf.input_ids_dev[:n], buf.positions_dev[:n])
    torch.testing.assert_close(hidden, eager)
    torch.testing.assert_close(aux, model.aux_hidden)
