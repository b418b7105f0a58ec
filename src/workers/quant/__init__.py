"""Quantization: pick a `QuantMethod` and install it by module replacement at load time.

    quantize_model(model, method)     before loading: every `layers.Linear` (plain, QKV, merged)
                                      becomes a `QuantLinear` with the same shards and forward
    finalize_quantization(model)      after loading: each method converts its weights

Methods (`--quantization`, or the checkpoint's `quantization_config.quant_method`):
    fp8 / ptpc_fp8       dynamic FP8 W8A8 from an unquantized checkpoint (w8a8.py)
    compressed-tensors   FP8 or INT8 W8A8 checkpoints (w8a8.py)
    gptq / awq           W4A16 checkpoints (w4a16.py)
The embedding and the LM head stay unquantized, as do modules the checkpoint's `ignore` /
`modules_to_not_convert` list names.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kernels.quant import FP8_DTYPE
from workers.layers import Linear, MergedLinear, QKVLinear
from workers.quant.linear import QuantLinear, QuantMethod, Shards
from workers.quant.w4a16 import awq_method, gptq_method
from workers.quant.w8a8 import W8A8Method, compressed_tensors_method

__all__ = ["QuantLinear", "QuantMethod", "finalize_quantization", "get_quant_method",
           "quantize_model"]


def get_quant_method(name: str, hf_config: dict) -> QuantMethod:
    """The method called `name`, configured from config.json's quantization_config if any."""
    qcfg = hf_config.get("quantization_config") or {}
    match name:
        case "fp8" | "ptpc_fp8":
            return W8A8Method(FP8_DTYPE, per_channel=name == "ptpc_fp8", dynamic_weights=True,
                              name=name)
        case "compressed-tensors":
            return compressed_tensors_method(qcfg)
        case "gptq":
            return gptq_method(qcfg)
        case "awq":
            return awq_method(qcfg)
    raise ValueError(f"quantization {name!r} is not supported")


def _ignored(hf_config: dict) -> list[str]:
    # compressed-tensors: "ignore" (names or "re:" patterns); AWQ: "modules_to_not_convert".
    qcfg = hf_config.get("quantization_config") or {}
    return list(qcfg.get("ignore") or []) + list(qcfg.get("modules_to_not_convert") or [])


def _is_ignored(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or f".{pattern}." in f".{name}.":
            return True
    return False


def _shards(layer: Linear) -> Shards:
    # The checkpoint tensors a packed layer stacks on its output dim, by loader shard id.
    if isinstance(layer, QKVLinear):
        sizes = layer.sizes
        return {"q": (0, sizes["q"]), "k": (sizes["q"], sizes["k"]),
                "v": (sizes["q"] + sizes["k"], sizes["v"])}
    if isinstance(layer, MergedLinear):
        offsets = [sum(layer.output_sizes[:i]) for i in range(len(layer.output_sizes))]
        return {i: (off, size) for i, (off, size) in
                enumerate(zip(offsets, layer.output_sizes, strict=True))}
    return {None: (0, layer.weight.shape[0])}


def quantize_model(model: nn.Module, method: QuantMethod, hf_config: dict) -> int:
    """Replace the model's linear layers by `QuantLinear`s of `method`; returns how many.

    Call inside the device context the model was built in, before loading weights. The
    checkpoint's packed names (`q_proj`) are checked against `ignore` through the model's
    `packed_modules_mapping`, so ignoring one shard of a packed layer is an error.
    """
    ignored = _ignored(hf_config)
    reverse: dict[str, list[str]] = {}
    for ckpt, (ours, _) in getattr(model, "packed_modules_mapping", {}).items():
        reverse.setdefault(ours, []).append(ckpt)
    count = 0
    for name, module in list(model.named_modules()):
        # isinstance: the tensor-parallel subclasses too (only at TP=1: config refuses TP > 1).
        if not isinstance(module, (Linear, QKVLinear, MergedLinear)):
            continue
        parent_name, _, attr = name.rpartition(".")
        ckpt_names = [f"{parent_name}.{c}" if parent_name else c
                      for c in reverse.get(attr, [attr])]
        skip = [_is_ignored(c, ignored) for c in ckpt_names]
        if any(skip):
            if not all(skip):
                raise ValueError(f"quantization ignores only part of packed layer {name!r}")
            continue
        weight = module.weight
        new = QuantLinear(weight.shape[1], weight.shape[0], _shards(module),
                          module.bias is not None, method, weight.dtype)
        setattr(model.get_submodule(parent_name), attr, new)
        count += 1
    return count


def finalize_quantization(model: nn.Module) -> None:
    """Run every QuantLinear's `process_weights_after_loading` (once, after loading)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.method.process_weights_after_loading(module)


def init_dummy_weights(model: nn.Module, gen: torch.Generator) -> None:
    """Random weights for load_format "dummy" (benchmarks): uniform floats, random int4 codes."""
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if pname == "g_idx":  # a valid group assignment: k // group size
                groups = module.scales.shape[0]
                param.data = (torch.arange(param.shape[0], device=param.device)
                              // (param.shape[0] // groups)).to(torch.int32)
            elif param.dtype == torch.int32:  # packed nibbles: any bit pattern is valid
                param.data.random_(-2**31, 2**31 - 1, generator=gen)
            elif param.dtype == torch.int8:
                param.data.random_(-127, 128, generator=gen)
            elif param.dtype == FP8_DTYPE:
                param.data = (torch.rand(param.shape, generator=gen, device=param.device) * 2 - 1
                              ).mul_(0.1).to(FP8_DTYPE)
            elif pname.endswith("scale") or pname == "scales":
                param.data.uniform_(1e-4, 2e-4, generator=gen)
