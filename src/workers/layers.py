"""Building blocks of decoder models: norms, rotary embedding, activation, linear and embedding.

Numerics follow Hugging Face transformers so that fp32 logits match it to ~1e-6: RMSNorm in fp32
then cast back, rotary cos/sin computed in fp32 then cast to the activation dtype. Norm, rotary and
activation run fused Triton kernels on CUDA tensors (`kernels.norm`, `kernels.rotary`,
`kernels.activation`) and those files' torch references elsewhere (CPU: tests, no GPU).

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` attribute. The
loader calls it with the checkpoint tensor; packed layers (QKVLinear, MergedLinear) use `shard_id`
to place each checkpoint tensor in its slice. The tensor-parallel subclasses
(`workers.parallel_layers`) narrow `loaded_weight` to their rank's shard before these copy it.

Dimension legend:
    T tokens, H hidden size, I intermediate size, V vocab size
    Hq query heads, Hkv key/value heads, D head dim
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.matmul import batch_invariant_linear, batch_invariant_linear_ref
from kernels.norm import rms_norm, rms_norm_ref
from kernels.rotary import rotary_embedding, rotary_embedding_ref

WeightLoader = Callable[..., None]


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: object = None) -> None:
    """Copy a whole checkpoint tensor into `param` (shapes must match exactly)."""
    assert shard_id is None, f"unexpected shard {shard_id!r} for an unpacked parameter"
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                         f"checkpoint {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def _new_param(*shape: int, loader: WeightLoader = default_weight_loader) -> nn.Parameter:
    # torch.empty: every value is overwritten by the loader; dtype/device come from the context
    # the model is built in.
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


# ---------------------------------------------------------------- norm and activation


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, optionally fused with the residual add."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _new_param(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual).

        x is [T, H], or [T, heads, D] for the per-head q/k norm (may be a strided view).
        """
        if x.is_cuda:
            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias over the last dim (vision towers)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _new_param(hidden_size)
        self.bias = _new_param(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class SiluAndMul(nn.Module):
    """[T, 2I] packed (gate | up) -> silu(gate) * up [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x) if x.is_cuda else silu_and_mul_ref(x)


# ---------------------------------------------------------------- rotary embedding


def rope_parameters(hf_config: dict) -> dict:
    """The rope settings of a config.json dict, in transformers-v5 shape ({"rope_type", ...})."""
    params = hf_config.get("rope_parameters")
    if params is None:  # legacy: top-level rope_theta plus an optional rope_scaling dict
        params = dict(hf_config.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding ("default" and "llama3" types), neox (rotate-half) layout."""

    def __init__(self, head_dim: int, max_position: int, params: dict) -> None:
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"rope_type {rope_type!r} is not supported")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("partial rotary embedding is not supported")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)  # [D/2]
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        # Same fp32 product as HF (position * inv_freq), so the table matches it bit for bit.
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())
        self.cos_cache = nn.Buffer(freqs.cos(), persistent=False)  # [max_position, D/2] fp32
        self.sin_cache = nn.Buffer(freqs.sin(), persistent=False)  # [max_position, D/2] fp32

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by positions [T]; on CUDA in place, one launch."""
        if q.is_cuda:
            return rotary_embedding(q, k, positions, self.cos_cache, self.sin_cache, inplace=True)
        return rotary_embedding_ref(q, k, positions, self.cos_cache, self.sin_cache)


# ---------------------------------------------------------------- linear layers


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           batch_invariant: bool) -> torch.Tensor:
    """x [T, K] W^T (+ b); batch-invariant: fixed-tile kernel (CUDA) or row by row (CPU)."""
    if not batch_invariant:
        return F.linear(x, weight, bias)
    if x.is_cuda:
        return batch_invariant_linear(x, weight, bias)
    return batch_invariant_linear_ref(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b); column- and row-parallel subclasses in `workers.parallel_layers`."""

    batch_invariant = False  # set per instance by the runner (`--batch-invariant`)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 loader: WeightLoader = default_weight_loader) -> None:
        super().__init__()
        self.weight = _new_param(out_features, in_features, loader=loader)
        self.bias = _new_param(out_features, loader=loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.batch_invariant)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (gate | up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias, loader=self.weight_loader)
        self.output_sizes = output_sizes

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int) -> None:
        """Copy checkpoint projection number `shard_id` into its rows of the stacked tensor."""
        offset = sum(self.output_sizes[:shard_id])
        _copy_rows(param, loaded_weight, offset, self.output_sizes[shard_id])


class QKVLinear(Linear):
    """q, k and v projections stacked on the output dim: [Hq*D | Hkv*D | Hkv*D]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, q_size + 2 * kv_size, bias, loader=self.weight_loader)
        self.sizes = {"q": q_size, "k": kv_size, "v": kv_size}

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str) -> None:
        """Copy the checkpoint's q, k or v tensor (`shard_id`) into its rows."""
        offset = {"q": 0, "k": self.sizes["q"], "v": self.sizes["q"] + self.sizes["k"]}[shard_id]
        _copy_rows(param, loaded_weight, offset, self.sizes[shard_id])


def _copy_rows(param: nn.Parameter, loaded: torch.Tensor, offset: int, size: int) -> None:
    # Rows = output features; works for weights [out, in] and biases [out] alike.
    target = param.data.narrow(0, offset, size)
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: slice {tuple(target.shape)}, "
                         f"checkpoint {tuple(loaded.shape)}")
    target.copy_(loaded)


# ---------------------------------------------------------------- embedding and LM head


class VocabEmbedding(nn.Module):
    """Token ids [T] -> embeddings [T, H]."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = _new_param(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Hidden states [N, H] -> fp32 logits [N, V]; may share its weight with the embedding."""

    def __init__(self, vocab_size: int, hidden_size: int,
                 tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        # Tied: the same Parameter object, so named_parameters() lists it once (as the embedding).
        self.weight = tied_to.weight if tied_to is not None else _new_param(vocab_size,
                                                                             hidden_size)

    batch_invariant = False  # set per instance by the runner (`--batch-invariant`)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.weight, None, self.batch_invariant).float()
