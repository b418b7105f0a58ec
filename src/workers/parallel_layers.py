"""Tensor-parallel variants of the linear, embedding and LM-head layers of `workers.layers`.

Each subclasses its single-rank layer, so code that recognizes `QKVLinear` or `Linear` (LoRA
wrapping, quantization) still does, and with a one-rank `TPGroup` each behaves exactly like its
base. Weight loaders receive the whole checkpoint tensor and narrow it to this rank's shard
before the base loader copies it.

    column parallel  W [out, in] split on out: each rank computes its slice of the outputs;
                     no communication (the next layer consumes the slice)
    row parallel     W [out, in] split on in: each rank multiplies its slice of the inputs,
                     an all-reduce sums the partial outputs; the bias lives on rank 0 only
    vocab parallel   the [V, H] table split on V (padded to a multiple of P): the embedding
                     looks up ids in its range, zeros the rest, all-reduces; the LM head
                     computes its logit columns and gathers them on rank 0, which samples

Attention heads: query heads split evenly (Hq % P == 0). Key/value heads split evenly when
Hkv >= P; with fewer (GQA, Hkv < P, P % Hkv == 0) each rank keeps the one kv head its query heads
read, replicated on P / Hkv ranks:

    Hq=4, Hkv=1, P=2:  rank 0 q heads 0 1 -> kv 0     rank 1 q heads 2 3 -> kv 0 (replica)

Dimension legend: T tokens, H hidden, V vocab, Vp padded vocab shard (ceil(V / P)), P ranks,
Hq / Hkv query / key-value heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.layers import (
    Linear,
    LMHead,
    MergedLinear,
    QKVLinear,
    VocabEmbedding,
    default_weight_loader,
)
from workers.parallel import SINGLE, TPGroup


def narrow_shard(loaded: torch.Tensor, dim: int, total: int, start: int, length: int
                 ) -> torch.Tensor:
    """loaded[start:start+length] along `dim`, after checking the checkpoint holds all `total`."""
    if loaded.dim() <= dim or loaded.shape[dim] != total:
        raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)}, expected {total} "
                         f"along dim {dim} (this rank keeps [{start}, {start + length}))")
    return loaded.narrow(dim, start, length)


def kv_head_shard(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first kv head, count) this rank holds: an even split, or one replicated head."""
    if num_kv_heads >= tp.size:
        return tp.shard(num_kv_heads, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp.size}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads}) when it exceeds it")
    return tp.rank // (tp.size // num_kv_heads), 1


class ColumnParallelLinear(Linear):
    """y[:, shard] = x W[shard]^T (+ b[shard]): this rank's slice of the output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        self.tp, self.total = tp, out_features
        self.start, size = tp.shard(out_features, "output features")
        super().__init__(in_features, size, bias, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's rows of the checkpoint tensor."""
        default_weight_loader(param, narrow_shard(loaded_weight, 0, self.total, self.start,
                                                  param.shape[0]))


class RowParallelLinear(Linear):
    """y = all_reduce(x[:, shard] W[:, shard]^T) + b: the input arrives already sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        self.tp, self.total = tp, in_features
        self.start, size = tp.shard(in_features, "input features")
        super().__init__(size, out_features, bias, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Weight: this rank's input columns. Bias: rank 0 only (others zero), so the
        all-reduce adds it once."""
        if param.dim() == 2:
            loaded_weight = narrow_shard(loaded_weight, 1, self.total, self.start, param.shape[1])
        elif not self.tp.is_first:
            loaded_weight = torch.zeros_like(loaded_weight)
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class MergedColumnParallelLinear(MergedLinear):
    """Column-parallel (gate | up): each projection split, this rank stacks its slices."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        self.tp = tp
        local = [tp.shard(size, "intermediate_size")[1] for size in output_sizes]
        super().__init__(in_features, local, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int) -> None:
        """Narrow checkpoint projection `shard_id` to this rank's rows, then stack it."""
        size = self.output_sizes[shard_id]
        loaded_weight = narrow_shard(loaded_weight, 0, size * self.tp.size, self.tp.rank * size,
                                     size)
        super().weight_loader(param, loaded_weight, shard_id)


class QKVParallelLinear(QKVLinear):
    """Column-parallel q/k/v by heads: this rank's query heads and the kv heads they read."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup = SINGLE) -> None:
        self.tp = tp
        q_start, self.num_heads = tp.shard(num_heads, "num_attention_heads")
        kv_start, self.num_kv_heads = kv_head_shard(num_kv_heads, tp)
        self.starts = {"q": q_start * head_dim, "k": kv_start * head_dim,
                       "v": kv_start * head_dim}
        self.totals = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                       "v": num_kv_heads * head_dim}
        super().__init__(hidden_size, head_dim, self.num_heads, self.num_kv_heads, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str) -> None:
        """Narrow the checkpoint's q, k or v tensor to this rank's heads, then place it."""
        loaded_weight = narrow_shard(loaded_weight, 0, self.totals[shard_id],
                                     self.starts[shard_id], self.sizes[shard_id])
        super().weight_loader(param, loaded_weight, shard_id)


def _vocab_shard(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    # (first id, rows held = Vp, rows holding real ids): the last shard may be part padding.
    rows = -(-vocab_size // tp.size)
    start = tp.rank * rows
    return start, rows, max(0, min(rows, vocab_size - start))


def _load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, vocab_size: int, start: int,
                     real: int) -> None:
    # Padding rows stay zero: the embedding never looks them up, the LM head's columns for them
    # are cut off after the gather.
    if loaded.shape != (vocab_size, param.shape[1]):
        raise ValueError(f"shape mismatch: parameter {(vocab_size, param.shape[1])} "
                         f"(this rank holds {tuple(param.shape)}), checkpoint "
                         f"{tuple(loaded.shape)}")
    param.data.zero_()
    param.data[:real].copy_(loaded.narrow(0, start, real))


class VocabParallelEmbedding(VocabEmbedding):
    """Token ids [T] -> [T, H]: rows of this rank's id range, zeros elsewhere, summed over P."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE) -> None:
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, rows, self.real = _vocab_shard(vocab_size, tp)
        super().__init__(rows, hidden_size)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's rows of the [V, H] table (zero padding rows)."""
        _load_vocab_rows(param, loaded_weight, self.vocab_size, self.start, self.real)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.real)
        out = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(LMHead):
    """Hidden [N, H] -> fp32 logits [N, V] on rank 0 (None elsewhere), vocab split over ranks."""

    def __init__(self, vocab_size: int, hidden_size: int,
                 tied_to: VocabParallelEmbedding | None = None, tp: TPGroup = SINGLE) -> None:
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, rows, self.real = _vocab_shard(vocab_size, tp)
        super().__init__(rows, hidden_size, tied_to=tied_to)
        if tied_to is None:
            self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's rows of the [V, H] head (zero padding rows)."""
        _load_vocab_rows(param, loaded_weight, self.vocab_size, self.start, self.real)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = self.tp.gather(super().forward(hidden))  # [N, P * Vp] on rank 0
        return None if logits is None else logits[:, : self.vocab_size]
