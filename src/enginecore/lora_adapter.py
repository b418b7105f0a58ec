"""`inspect_lora_adapter`: check a PEFT LoRA adapter directory without torch.

The API processes check every adapter before a request reaches the engine (files, PEFT features
we support, rank, target modules, shapes against the base model), reading only the safetensors
header; the workers call it again to learn the rank, scaling and tensor places before loading.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import msgspec

# The projections an adapter may target (PEFT module names of the Llama family).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj")
_LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_LORA_WEIGHTS_FILE = "adapter_model.safetensors"


class LoRAAdapterInfo(msgspec.Struct, frozen=True):
    """What `inspect_lora_adapter` learned: rank, scaling and every tensor's place and shape."""

    rank: int
    scaling: float  # lora_alpha / rank (or / sqrt(rank) with use_rslora)
    # checkpoint key -> (layer index, module name, "A" | "B", shape)
    tensors: dict[str, tuple[int, str, str, list[int]]]


def lora_module_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) for a Llama-family config.json dict."""
    cfg = hf_config.get("text_config", hf_config)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, (cfg.get("num_key_value_heads") or heads) * head_dim
    inter = cfg["intermediate_size"]
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def inspect_lora_adapter(path: str, max_lora_rank: int,
                         model_dir: str | None = None) -> LoRAAdapterInfo:
    """Check a PEFT adapter directory without loading its tensors (reads the safetensors header).

    ValueError (naming the problem) for: a missing directory or file, an unsupported PEFT feature,
    a rank above `max_lora_rank`, a module other than q/k/v/o/gate/up/down, or (with `model_dir`)
    a shape or layer that does not fit the base model.
    """
    root = Path(path)
    cfg_file, weights_file = root / "adapter_config.json", root / _LORA_WEIGHTS_FILE
    if not root.is_dir():
        raise ValueError(f"LoRA adapter not found: {path!r} is not a directory")
    if not cfg_file.is_file():
        raise ValueError(f"Invalid adapter configuration: no adapter_config.json in {path!r}")
    if not weights_file.is_file():
        raise ValueError(f"LoRA adapter {path!r}: no {_LORA_WEIGHTS_FILE} (only the safetensors "
                         "format is supported)")
    try:
        cfg = json.loads(cfg_file.read_text())
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Invalid adapter configuration in {path!r}: {e!r}") from None
    _check_lora_features(cfg, path)
    if not 0 < rank <= max_lora_rank:
        raise ValueError(f"LoRA rank exceeds maximum: adapter {path!r} has rank {rank}, "
                         f"max_lora_rank is {max_lora_rank}")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    tensors: dict[str, tuple[int, str, str, list[int]]] = {}
    for key, shape in _safetensors_shapes(weights_file).items():
        m = _LORA_KEY.search(key)
        if m is None or m[2] not in LORA_TARGET_MODULES:
            raise ValueError(f"LoRA adapter {path!r}: unsupported target module in tensor "
                             f"{key!r} (supported: {', '.join(LORA_TARGET_MODULES)})")
        tensors[key] = (int(m[1]), m[2], m[3], shape)
    if model_dir is not None:
        _check_lora_shapes(tensors, rank, path, json.loads((Path(model_dir) /
                                                            "config.json").read_text()))
    return LoRAAdapterInfo(rank=rank, scaling=scaling, tensors=tensors)


def _check_lora_features(cfg: dict, path: str) -> None:
    unsupported = [name for name, bad in (
        ("use_dora", bool(cfg.get("use_dora"))),
        ("bias", cfg.get("bias", "none") != "none"),
        ("modules_to_save", bool(cfg.get("modules_to_save"))),
        ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out"))),
        ("rank_pattern", bool(cfg.get("rank_pattern"))),
        ("alpha_pattern", bool(cfg.get("alpha_pattern")))) if bad]
    if unsupported:
        raise ValueError(f"LoRA adapter {path!r}: unsupported adapter_config.json setting(s) "
                         f"{', '.join(unsupported)}")


def _check_lora_shapes(tensors: dict, rank: int, path: str, hf_config: dict) -> None:
    shapes = lora_module_shapes(hf_config)
    num_layers = hf_config.get("text_config", hf_config)["num_hidden_layers"]
    for key, (layer, module, kind, shape) in tensors.items():
        fan_in, fan_out = shapes[module]
        want = [rank, fan_in] if kind == "A" else [fan_out, rank]
        if layer >= num_layers or shape != want:
            raise ValueError(f"LoRA adapter {path!r} does not fit the base model: tensor {key!r} "
                             f"has shape {shape}, expected {want} in layers 0..{num_layers - 1}")


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    # Layout: 8-byte little-endian header length, then a JSON header {name: {dtype, shape, ...}}.
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100 << 20:
            raise ValueError(f"{str(file)!r} is not a safetensors file")
        header = json.loads(f.read(size))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
