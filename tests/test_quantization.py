"""Quantized linear layers in the model (CPU reference paths), fp32 tiny checkpoints.

Each checkpoint method is checked against its dequantized twin (tests/quant_ckpt.py): W4A16
(weight-only) must match it to fp32 rounding; W8A8 also quantizes activations per token, so its
layers match `scaled_mm_ref` of the quantized operands exactly and the dequantized model only
approximately. Greedy agreement of whole engines is in test_quant_engine.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from quant_ckpt import write_quantized
from safetensors.torch import load_file, save_file

from enginecore.config import EngineConfig
from kernels.quant import FP8_DTYPE, per_token_quant_ref, quantize_ref, scaled_mm_ref
from workers.attention import kv_cache_torch_dtype
from workers.models import load_model
from workers.quant import QuantLinear
from workers.quant.w4a16 import AWQ_ORDER, dequantize_w4, pack_int4_cols, unpack_int4_cols

W4 = [("gptq", False), ("gptq", True), ("awq", False)]
W8 = ["ct-int8", "ct-fp8", "ct-fp8-tensor"]


@pytest.fixture(scope="module")
def llama(tiny_models) -> str:
    return tiny_models["llama"]  # biases off, untied head: every linear is a decoder linear


@pytest.fixture(scope="module")
def ckpts(llama, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("quant")
    out = {f"{m}-{ao}": write_quantized(llama, root / f"{m}-{ao}", m, act_order=ao)
           for m, ao in W4}
    out |= {m: write_quantized(llama, root / m, m) for m in W8}
    return out


def _logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    from test_model_parity import PagedBatcher

    return PagedBatcher(model).step([("a", tokens)])


def test_awq_order_documented():
    # Nibble i of an AWQ word holds column AWQ_ORDER[i]: columns 0..7 valued 0..7 pack to
    # nibbles 0 2 4 6 1 3 5 7 (low to high).
    word = pack_int4_cols(torch.arange(8, dtype=torch.int32)[None, :], AWQ_ORDER).item()
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(AWQ_ORDER)
    assert torch.equal(unpack_int4_cols(torch.tensor([[word]]), AWQ_ORDER),
                       torch.arange(8, dtype=torch.int32)[None, :])


@pytest.mark.parametrize("method,act_order", W4)
def test_w4a16_model_matches_dequantized(ckpts, method, act_order):
    quant_dir, deq_dir = ckpts[f"{method}-{act_order}"]
    model = load_model(quant_dir, torch.float32, "cpu")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 8 and all(m.method.name == method for m in layers)
    # Every layer's weight is exactly its dequantized checkpoint weight (q|k|v, gate|up stacked).
    deq = load_file(str(Path(deq_dir) / "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    expected = torch.cat([deq[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(dequantize_w4(qkv), expected, rtol=0, atol=1e-6)
    tokens = list(range(7, 40, 3))
    ref = _logits(load_model(deq_dir, torch.float32, "cpu"), tokens)
    torch.testing.assert_close(_logits(model, tokens), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", W8)
def test_w8a8_layer_matches_reference(ckpts, method):
    quant_dir, _ = ckpts[method]
    model = load_model(quant_dir, torch.float32, "cpu")
    layer = model.model.layers[0].mlp.gate_up_proj
    raw = load_file(str(Path(quant_dir) / "model.safetensors"))
    p = "model.layers.0.mlp"
    w_q = torch.cat([raw[f"{p}.gate_proj.weight"], raw[f"{p}.up_proj.weight"]])
    scales = [raw[f"{p}.{n}_proj.weight_scale"] for n in ("gate", "up")]
    dtype = torch.int8 if method == "ct-int8" else FP8_DTYPE
    assert layer.weight.dtype == dtype
    if method == "ct-fp8-tensor":  # one scale per checkpoint tensor, repeated over its rows
        w_scale = torch.cat([s.expand(128) for s in scales])
    else:
        w_scale = torch.cat(scales).reshape(-1)
    x = torch.randn(6, 64)
    if method == "ct-fp8-tensor":
        x_scale = torch.full((6, 1), 0.05)
        x_q = quantize_ref(x, x_scale, dtype)
    else:
        x_q, x_scale = per_token_quant_ref(x, dtype)
    ref = scaled_mm_ref(x_q, w_q, x_scale, w_scale, torch.float32)
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", W8)
def test_w8a8_model_close_to_dequantized(ckpts, method):
    quant_dir, deq_dir = ckpts[method]
    tokens = list(range(7, 40, 3))
    ours = _logits(load_model(quant_dir, torch.float32, "cpu"), tokens)
    ref = _logits(load_model(deq_dir, torch.float32, "cpu"), tokens)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err < (0.05 if method == "ct-int8" else 0.15), err


@pytest.mark.parametrize("method", ["fp8", "ptpc_fp8"])
def test_dynamic_fp8_scales(llama, method):
    model = load_model(llama, torch.float32, "cpu", quantization=method)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8_DTYPE and qkv.weight_scale_n.shape == (128,)
    raw = load_file(str(Path(llama) / "model.safetensors"))
    ws = [raw[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    fmax = torch.finfo(FP8_DTYPE).max
    if method == "fp8":  # one scale per checkpoint tensor (q, k, v keep their own)
        want = torch.cat([(w.abs().amax() / fmax).expand(w.shape[0]) for w in ws])
    else:  # one per output channel
        want = torch.cat([w.abs().amax(dim=1) / fmax for w in ws])
    torch.testing.assert_close(qkv.weight_scale_n, want)
    deq = qkv.weight.float() * qkv.weight_scale_n[:, None]
    full = torch.cat(ws)
    assert ((deq - full).abs() <= full.abs() / 16 + want[:, None] * 2**-9).all()


def test_config_detects_and_validates(ckpts, llama):
    gptq_dir = ckpts["gptq-True"][0]
    assert EngineConfig.create(gptq_dir).model.quantization == "gptq"
    assert EngineConfig.create(llama, quantization="fp8").model.quantization == "fp8"
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        EngineConfig.create(gptq_dir, quantization="awq")
    with pytest.raises(ValueError, match="needs a checkpoint quantized"):
        EngineConfig.create(llama, quantization="gptq")
    with pytest.raises(ValueError, match="quantization 'int3' is not supported"):
        EngineConfig.create(llama, quantization="int3")


def test_bad_quantization_config_names_the_field(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["gptq-False"][0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits=8"):
        load_model(bad, torch.float32, "cpu")
    cfg["quantization_config"] |= {"bits": 4, "group_size": 48}  # does not divide K=64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="group size 48"):
        load_model(bad, torch.float32, "cpu")


def test_ignore_list_keeps_layers_unquantized(ckpts, tmp_path):
    # compressed-tensors `ignore`: the named modules load as ordinary full-precision layers.
    src = Path(ckpts["ct-int8"][0])
    dst = tmp_path / "ignored"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    deq = load_file(str(Path(ckpts["ct-int8"][1]) / "model.safetensors"))
    for name in [n for n in tensors if "down_proj" in n]:
        del tensors[name]
    tensors |= {n: w for n, w in deq.items() if "down_proj" in n}
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*down_proj"]
    (dst / "config.json").write_text(json.dumps(cfg))
    model = load_model(dst, torch.float32, "cpu")
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, QuantLinear)


def test_kv_cache_scales_from_checkpoint(llama, tmp_path):
    dst = tmp_path / "kv-scales"
    shutil.copytree(llama, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors |= {"model.layers.1.self_attn.k_scale": torch.tensor(0.5),
                "model.layers.1.self_attn.v_scale": torch.tensor([2.0])}
    save_file(tensors, str(dst / "model.safetensors"))
    model = load_model(dst, torch.float32, "cpu")
    attn0, attn1 = (layer.self_attn.attn for layer in model.model.layers)
    assert (attn0.k_scale, attn0.v_scale) == (1.0, 1.0)  # absent: 1.0
    assert (attn1.k_scale, attn1.v_scale) == (0.5, 2.0)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor(0.0)
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match="v_scale must be positive"):
        load_model(dst, torch.float32, "cpu")


def test_fp8_kv_cache_halves_block_bytes(llama):
    # bf16 model: an fp8 block takes half the bytes, so the same memory holds twice the blocks.
    from workers.runner import ModelRunner

    sizes = {}
    for kv_dtype in ("auto", "fp8"):
        cfg = EngineConfig.create(llama, dtype="bfloat16", kv_cache_dtype=kv_dtype)
        runner = ModelRunner(cfg, torch.device("cpu"), torch.bfloat16)
        sizes[kv_dtype] = runner.bytes_per_block()
        runner.init_kv_cache(4)
        assert runner.kv_caches[0].dtype == runner.kv_dtype
    assert sizes["auto"] == 2 * sizes["fp8"]
    assert runner.kv_dtype == torch.float8_e4m3fn
    assert kv_cache_torch_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    assert kv_cache_torch_dtype("auto", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig.create(llama, kv_cache_dtype="int4")
