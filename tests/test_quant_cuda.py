"""Quantized layers and models on CUDA (compiled Triton, torch._scaled_mm) against the CPU path.

Skipped without a GPU. The CPU path is the torch reference (tests/test_quantization.py checks it
against dequantized checkpoints); here each method's CUDA layers, in bf16 and fp16, must match
it, and a CUDA engine with every method must agree with transformers like the CPU one does.
Run: TRITON_INTERPRET=0 pytest -q tests/test_quant_cuda.py tests/kernels/test_quant.py
tests/kernels/test_kv_fp8.py
"""

from __future__ import annotations

import pytest
import torch
from quant_ckpt import write_quantized

from workers.models import load_model
from workers.quant import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CKPT_METHODS = [("gptq", True), ("gptq", False), ("awq", False), ("ct-int8", False),
                ("ct-fp8", False), ("ct-fp8-tensor", False)]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> str:
    """A tiny llama wide enough for the CUDA kernels' tiles (K, N multiples of 128)."""
    from workers.demo import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "llama", arch="llama",
                                 hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64)


def _pairs(cpu_model, cuda_model):
    cpu = {n: m for n, m in cpu_model.named_modules() if isinstance(m, QuantLinear)}
    gpu = {n: m for n, m in cuda_model.named_modules() if isinstance(m, QuantLinear)}
    assert cpu.keys() == gpu.keys() and cpu
    return [(n, cpu[n], gpu[n]) for n in cpu]


def _check_layers(cpu_model, cuda_model, dtype, tol):
    for name, cpu_layer, gpu_layer in _pairs(cpu_model, cuda_model):
        for m in (1, 7, 64, 300):
            x = torch.randn(m, cpu_layer.in_features)
            ref = cpu_layer(x)
            out = gpu_layer(x.to("cuda", dtype)).float().cpu()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (name, m, err)


@pytest.mark.parametrize("method,act_order", CKPT_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpoint_layers_cuda(wide, tmp_path, method, act_order, dtype):
    quant_dir, _ = write_quantized(wide, tmp_path / method, method, group=64, act_order=act_order)
    cpu_model = load_model(quant_dir, torch.float32, "cpu")
    cuda_model = load_model(quant_dir, dtype, "cuda")
    # bf16 activations/outputs (8 bits of mantissa) and fp8 activation rounding on top
    tol = 0.06 if method.startswith("ct-fp8") else 0.03
    _check_layers(cpu_model, cuda_model, dtype, tol)


@pytest.mark.parametrize("method", ["fp8", "ptpc_fp8"])
def test_dynamic_fp8_layers_cuda(wide, method):
    cpu_model = load_model(wide, torch.float32, "cpu", quantization=method)
    cuda_model = load_model(wide, torch.bfloat16, "cuda", quantization=method)
    _check_layers(cpu_model, cuda_model, torch.bfloat16, 0.06)
