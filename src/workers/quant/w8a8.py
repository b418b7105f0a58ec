"""W8A8: 8-bit weights and 8-bit activations (FP8 e4m3 or INT8), symmetric, scales in fp32.

Two ways in, one GEMM:
    dynamic (`--quantization fp8` / `ptpc_fp8`): the checkpoint is bf16/fp16/fp32; each weight
        is quantized to FP8 after loading, with one scale per checkpoint tensor (`fp8`, vLLM's
        per-tensor default; the q, k and v of a packed layer keep their own) or per output
        channel (`ptpc_fp8`).
    compressed-tensors checkpoints (`quantization_config.quant_method` "compressed-tensors",
        format float-quantized / int-quantized / naive-quantized): `weight` [N, K] int8 or
        float8_e4m3fn, `weight_scale` [N, 1] (strategy "channel") or one value per tensor
        ("tensor"), and `input_scale` (one value per tensor) when activations are static.

Activations are quantized per token at run time (dynamic), or with the static per-tensor
`input_scale` (the max over a packed layer's shards, as vLLM does). In the GEMM every weight scale
is a vector over N (a per-tensor scale repeated over its shard's rows):

    y [M, N] = (x_q [M, K] @ w_q [N, K]^T) * scale_x [M, 1] * scale_w [N]   (+ bias)

CUDA: FP8 goes to cuBLASLt through `torch._scaled_mm` (row-wise scales), INT8 to the Triton
`kernels.quant.scaled_mm`; CPU runs the torch references (dequantized fp32 math).

Dimension legend: M tokens, K in_features, N out_features, S shards of a packed layer.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from kernels.quant import (
    FP8_DTYPE,
    per_token_quant,
    per_token_quant_ref,
    quantize_ref,
    scaled_mm,
    scaled_mm_ref,
)
from workers.quant.linear import QuantLinear, per_shard_scalar

logger = logging.getLogger("workers")
_QMAX = {torch.int8: 127.0, FP8_DTYPE: torch.finfo(FP8_DTYPE).max}


@dataclass
class W8A8Method:
    """8-bit weights x 8-bit activations; see the module docstring."""

    weight_dtype: torch.dtype  # torch.int8 | torch.float8_e4m3fn
    per_channel: bool  # weight scale per output channel (else one per checkpoint tensor)
    dynamic_weights: bool  # quantize a full-precision checkpoint weight after loading
    static_input: bool = False  # activations use the checkpoint's per-tensor input_scale
    name: str = "w8a8"

    def create_weights(self, layer: QuantLinear) -> None:
        """weight [N, K] (full precision when dynamic), its scales, the static input scale."""
        n, k = layer.out_features, layer.in_features
        if self.dynamic_weights:
            layer.add_param("weight", (n, k), layer.dtype, out_dim=0)
            return
        layer.add_param("weight", (n, k), self.weight_dtype, out_dim=0)
        if self.per_channel:
            layer.add_param("weight_scale", (n, 1), torch.float32, out_dim=0)
        else:
            layer.add_param("weight_scale", (len(layer.shards),), torch.float32, out_dim=None,
                            loader=per_shard_scalar(layer, "weight_scale"))
        if self.static_input:
            layer.add_param("input_scale", (len(layer.shards),), torch.float32, out_dim=None,
                            loader=per_shard_scalar(layer, "input_scale"))

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        """Quantize (dynamic) or reshape the scales to one fp32 vector over N."""
        if self.dynamic_weights:
            w_q, scale = self._quantize(layer, layer.weight.data)
            layer.weight.data = w_q
        elif self.per_channel:
            scale = layer.weight_scale.data.reshape(-1)
        else:
            scale = _repeat_per_shard(layer, layer.weight_scale.data)
        layer.add_buffer("weight_scale_n", scale.float().contiguous())  # [N]
        if layer.weight.is_cuda and self.weight_dtype == FP8_DTYPE:
            # Probe now, not inside a CUDA-graph capture (the answer is cached).
            _rowwise_scaled_mm_works(layer.weight.device.index or 0)
        if self.static_input:
            # One activation scale for the fused GEMM: the largest shard's (vLLM's choice).
            layer.add_buffer("input_scale_max", layer.input_scale.data.max().reshape(1, 1).float())

    def _quantize(self, layer: QuantLinear, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # w [N, K] -> (w_q [N, K], scale [N]): per row, or per checkpoint tensor (shard).
        qmax = _QMAX[self.weight_dtype]
        if self.per_channel:
            amax = w.float().abs().amax(dim=1)  # [N]
        else:
            amax = torch.cat([w[off:off + size].float().abs().amax().expand(size)
                              for off, size in layer.shards.values()])
        scale = (amax / qmax).clamp(min=1e-12)
        return quantize_ref(w, scale[:, None], self.weight_dtype), scale

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> y [M, N] in x's dtype."""
        x = x.contiguous()
        if self.static_input:
            x_scale = layer.input_scale_max.expand(x.shape[0], 1).contiguous()
            x_q = quantize_ref(x, x_scale, self.weight_dtype)
        elif x.is_cuda:
            x_q, x_scale = per_token_quant(x, self.weight_dtype)
        else:
            x_q, x_scale = per_token_quant_ref(x, self.weight_dtype)
        bias = layer.bias
        if not x.is_cuda:
            return scaled_mm_ref(x_q, layer.weight, x_scale, layer.weight_scale_n, x.dtype, bias)
        if self.weight_dtype == FP8_DTYPE and _scaled_mm_ok(x_q.shape[1], layer.out_features,
                                                            x.device):
            return _fp8_scaled_mm(x_q, layer.weight, x_scale, layer.weight_scale_n, x.dtype, bias)
        return scaled_mm(x_q, layer.weight, x_scale, layer.weight_scale_n, x.dtype, bias)


def _repeat_per_shard(layer: QuantLinear, values: torch.Tensor) -> torch.Tensor:
    # [S] one value per shard -> [N] repeated over each shard's rows.
    sizes = torch.tensor([size for _, size in layer.shards.values()], device=values.device)
    return values.float().repeat_interleave(sizes)


def _scaled_mm_ok(k: int, n: int, device: torch.device) -> bool:
    # cuBLASLt FP8 wants both GEMM dims that touch the weight to be multiples of 16.
    return k % 16 == 0 and n % 16 == 0 and _rowwise_scaled_mm_works(device.index or 0)


@functools.cache
def _rowwise_scaled_mm_works(device_index: int) -> bool:
    """Whether this GPU and torch build run row-wise-scaled FP8 `torch._scaled_mm` (probed once;
    otherwise FP8 goes through the Triton kernel)."""
    try:
        a = torch.ones(16, 32, device=f"cuda:{device_index}").to(FP8_DTYPE)
        scale = torch.ones(16, 1, device=a.device)
        _fp8_scaled_mm(a, a, scale, scale[:, 0].contiguous(), torch.bfloat16, None)
        return True
    except (RuntimeError, NotImplementedError) as e:
        logger.warning("torch._scaled_mm with row-wise scales is unavailable (%s); FP8 GEMMs "
                       "use the Triton kernel", e)
        return False


def _fp8_scaled_mm(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor,
                   w_scale: torch.Tensor, out_dtype: torch.dtype,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales (cuBLASLt wants a bf16 output for those)."""
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale[None, :],
                         out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)


def compressed_tensors_method(quant_config: dict) -> W8A8Method:
    """The W8A8 method described by a compressed-tensors `quantization_config` dict."""
    groups = list((quant_config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: expected one config group, got {len(groups)}")
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
    kind, bits = weights.get("type", "int"), weights.get("num_bits")
    if bits != 8 or kind not in ("int", "float") or not weights.get("symmetric", True):
        raise ValueError("compressed-tensors: only symmetric 8-bit int/float weights (W8A8) are "
                         f"supported, got weights {weights}")
    strategy = weights.get("strategy")
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors: weight strategy {strategy!r} is not supported "
                         "(channel, tensor)")
    if inputs is None or inputs.get("num_bits") != 8 or inputs.get("type", kind) != kind:
        raise ValueError("compressed-tensors: W8A8 needs 8-bit input_activations of the weight "
                         f"type, got {inputs}")
    if not inputs.get("symmetric", True):
        raise ValueError("compressed-tensors: asymmetric activations are not supported")
    dynamic = bool(inputs.get("dynamic", False))
    if not dynamic and inputs.get("strategy", "tensor") != "tensor":
        raise ValueError("compressed-tensors: static activations must be per tensor")
    return W8A8Method(weight_dtype=torch.int8 if kind == "int" else FP8_DTYPE,
                      per_channel=strategy == "channel", dynamic_weights=False,
                      static_input=not dynamic, name=f"compressed-tensors-w8a8-{kind}")
