"""Per-tensor FP8 KV-cache scales from the checkpoint (`--kv-cache-dtype fp8`).

FP8 checkpoints made by vLLM's tools and llm-compressor (kv_cache_scheme) store one scalar per
layer and tensor: `model.layers.{i}.self_attn.k_scale` and `.v_scale` (real = stored * scale).
`install_kv_scales` registers matching optional parameters on every module that owns an
`Attention` as `attn`; their loader hands the value to that layer as a host float (the kernels
take the scales as launch arguments, so CUDA graphs captured later see them). A checkpoint
without them leaves the scales at 1.0, as vLLM does; with an unquantized cache they are unused.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import Attention


def install_kv_scales(model: nn.Module) -> int:
    """Add optional `k_scale` / `v_scale` parameters next to each Attention; returns how many."""
    count = 0
    for module in list(model.modules()):
        attn = getattr(module, "attn", None)
        if not isinstance(attn, Attention):
            continue
        for name in ("k_scale", "v_scale"):
            param = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
            param.weight_loader = _loader(attn, name)  # type: ignore[attr-defined]
            param.optional = True  # type: ignore[attr-defined]
            module.register_parameter(name, param)
        count += 1
    return count


def _loader(attn: Attention, name: str):
    def weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"{name}: expected one value, got shape {tuple(loaded.shape)}")
        value = float(loaded.reshape(()).float())
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
        param.data.fill_(value)
        setattr(attn, name, value)
    return weight_loader
