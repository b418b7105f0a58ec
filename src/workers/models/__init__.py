"""Model registry (HF architecture name -> class, imported lazily) and `load_model`.

config.json is read with `json`, not transformers: importing transformers costs seconds that every
worker start would pay for nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from workers import quant
from workers.loader import load_weights
from workers.parallel import SINGLE, TPGroup
from workers.quant.kv_scales import install_kv_scales

# architecture -> (module, class name); a module is imported only when its model is used.
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("workers.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("workers.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("workers.models.llama", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("workers.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("workers.models.qwen3_moe", "Qwen2MoeForCausalLM"),
    "MixtralForCausalLM": ("workers.models.qwen3_moe", "MixtralForCausalLM"),
    "Qwen2VLForConditionalGeneration": ("workers.models.qwen2_vl",
                                        "Qwen2VLForConditionalGeneration"),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def supported_architectures() -> list[str]:
    """Architecture names `load_model` accepts."""
    return sorted(_REGISTRY)


def model_class(architecture: str) -> type[nn.Module]:
    """The model class registered for an HF architecture name."""
    if architecture not in _REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    module, name = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), name)


def read_hf_config(model_dir: str | Path) -> dict:
    """config.json as a dict (the text config, for multimodal-style nesting)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = cfg.get("text_config")
    return {**cfg, **text} if text else cfg


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str,
                  hf_config: dict | None = None) -> torch.dtype:
    """A torch dtype from a name; "auto": fp32 on CPU, else the checkpoint's half type or bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
        return _DTYPES[dtype]
    if torch.device(device).type == "cpu":
        return torch.float32
    saved = (hf_config or {}).get("dtype") or (hf_config or {}).get("torch_dtype")
    return _DTYPES[saved] if saved in ("float16", "bfloat16") else torch.bfloat16


def load_model(model_dir: str | Path, dtype: torch.dtype | str = "auto",
               device: torch.device | str = "cpu", load_format: str = "auto",
               tp: TPGroup = SINGLE, quantization: str | None = None) -> nn.Module:
    """Build the checkpoint's model on `device` in `dtype`, load its weights, set eval mode.

    With a tensor-parallel group `tp` the model holds (and loads) this rank's shards only.

    load_format "dummy" skips the safetensors and fills every parameter with small uniform noise
    (benchmarks of large shapes need only config.json). `quantization` (default: the
    checkpoint's quant_method) swaps the linear layers for `workers.quant` ones before loading.
    """
    hf_config = read_hf_config(model_dir)
    architecture = (hf_config.get("architectures") or [""])[0]
    cls = model_class(architecture)
    dtype = resolve_dtype(dtype, device, hf_config)
    quantization = quantization or (hf_config.get("quantization_config") or {}).get(
        "quant_method")
    with torch.device(device), default_dtype(dtype):
        model = cls(hf_config, tp=tp)
        install_kv_scales(model)
        if quantization:
            quant.quantize_model(model, quant.get_quant_method(quantization, hf_config),
                                 hf_config)
    if load_format == "dummy":
        gen = torch.Generator(device=device).manual_seed(0)
        for param in model.parameters():
            if param.is_floating_point() and param.element_size() > 1:  # not int / fp8
                param.data.uniform_(-1e-3, 1e-3, generator=gen)
        quant.init_dummy_weights(model, gen)
    else:
        load_weights(model, model_dir)
    quant.finalize_quantization(model)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules under this dtype (parameters are torch.empty(...): they take it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
