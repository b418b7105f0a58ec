"""`QuantLinear`: the module a quantized linear layer is replaced with at load time.

It keeps the replaced layer's interface (`forward(x) -> y`, `in_features`, `out_features`, an
optional `bias`) and delegates the weights to a `QuantMethod`: `create_weights` registers the
method's parameters through `add_param`, the loader fills them, `process_weights_after_loading`
converts them to the kernel layout, `apply` runs the GEMM.

Packed layers (q|k|v, gate|up) keep their shards: every parameter is created with the axis that
runs over output features (`out_dim`) and how many output features one element covers (`pack`:
8 for int4 packed along N, else 1), and its weight_loader copies checkpoint shard `shard_id` to
[offset / pack, (offset + size) / pack) of that axis. Parameters without an output axis (a g_idx
over the input, a per-tensor scale) are handled by a per-parameter loader the method supplies.

Dimension legend: M tokens, K in_features, N out_features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

# shard id (None for an unpacked layer, "q"/"k"/"v", 0/1) -> (row offset, rows) in the N axis
Shards = dict[object, tuple[int, int]]
# weight_loader(param, checkpoint tensor, shard id); the model loader omits the id when None
ShardLoader = Callable[..., None]


class QuantMethod(Protocol):
    """How one quantization scheme stores, loads and multiplies a linear layer's weight."""

    name: str

    def create_weights(self, layer: QuantLinear) -> None:
        """Register the checkpoint's parameters on `layer` (through `layer.add_param`)."""

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        """Convert loaded parameters to the layout `apply` uses (once, after loading)."""

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> y [M, N] (bias included)."""


class QuantLinear(nn.Module):
    """A linear layer whose weight a `QuantMethod` owns; same forward as `layers.Linear`."""

    def __init__(self, in_features: int, out_features: int, shards: Shards, bias: bool,
                 method: QuantMethod, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shards = shards
        self.method = method
        self.dtype = dtype  # activation / output dtype
        self.bias = self.add_param("bias", (out_features,), dtype, out_dim=0) if bias else None
        method.create_weights(self)

    def add_buffer(self, name: str, tensor: torch.Tensor | None) -> None:
        """A derived tensor a method computes after loading (moves with the module)."""
        self.register_buffer(name, tensor, persistent=False)

    def add_param(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  out_dim: int | None, pack: int = 1,
                  loader: ShardLoader | None = None) -> nn.Parameter:
        """Register parameter `name`; its loader places shards along `out_dim` (see module doc)."""
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        if loader is None:
            assert out_dim is not None, f"{name}: a parameter without out_dim needs a loader"

            def loader(p: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
                self._copy_shard(p, loaded, shard_id, out_dim, pack)
        param.weight_loader = loader  # type: ignore[attr-defined]
        self.register_parameter(name, param)
        return param

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        """(offset, size) of `shard_id` in the N axis; a clear error for an unknown shard."""
        if shard_id not in self.shards:
            raise ValueError(f"unknown shard {shard_id!r} (layer shards: {list(self.shards)})")
        return self.shards[shard_id]

    def _copy_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object,
                    out_dim: int, pack: int) -> None:
        offset, size = self.shard_range(shard_id)
        if offset % pack or size % pack:
            raise ValueError(f"shard {shard_id!r} ({offset}+{size}) is not a multiple of the "
                             f"packing factor {pack}")
        target = param.data.narrow(out_dim, offset // pack, size // pack)
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch: slice {tuple(target.shape)}, "
                             f"checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded.to(target.dtype) if loaded.dtype != target.dtype else loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        lead = x.shape[:-1]
        y = self.method.apply(self, x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method.name}"


def same_for_every_shard(name: str) -> ShardLoader:
    """Loader of an input-side parameter (g_idx) that every shard of a packed layer repeats."""
    seen: set[int] = set()

    def loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.shape != loaded.shape:
            raise ValueError(f"{name}: shape mismatch: parameter {tuple(param.shape)}, "
                             f"checkpoint {tuple(loaded.shape)}")
        if id(param) in seen and not torch.equal(param.data, loaded.to(param.device, param.dtype)):
            raise ValueError(f"{name} differs between the shards of one packed layer "
                             f"(shard {shard_id!r}); this layout is not supported")
        seen.add(id(param))
        param.data.copy_(loaded)
    return loader


def per_shard_scalar(layer: QuantLinear, name: str) -> ShardLoader:
    """Loader of a per-tensor scale: a [num_shards] parameter, one entry per checkpoint tensor."""
    index = {shard: i for i, shard in enumerate(layer.shards)}

    def loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        layer.shard_range(shard_id)
        if loaded.numel() != 1:
            raise ValueError(f"{name}: expected one value per tensor, got shape "
                             f"{tuple(loaded.shape)}")
        param.data[index[shard_id]] = loaded.reshape(()).to(param.dtype)
    return loader
