"""`LoRALinear`: a linear layer plus the LoRA deltas of every adapter slot, for mixed batches.

`wrap_lora_layers` replaces the q/k/v (packed qkv_proj), o_proj, gate/up (packed gate_up_proj)
and down_proj modules of a loaded Llama-family model by `LoRALinear(base)`. The base layers know
nothing of LoRA (their weights, loaders and any quantization stay as they are); the wrapper adds,
per token, the delta of that token's adapter slot:

    y = base(x);  t = x @ A[slot]^T (all slices at once);  y[:, slice l] += t_l @ B_l[slot]^T

A packed layer holds one A stack for all its slices ([S, L*R, in]: q, k, v share x) and one B
stack with the slices' B matrices on the output dim ([S, sum N_l, R]); one shrink and one expand
launch per layer, whatever the number of slices or adapters. Slot weights are zero past an
adapter's rank, and zero for an empty slot. The scaling (alpha / r) is folded into B.

Per-step token -> slot data comes from the shared `LoRABatch` (persistent buffers, CUDA-graph
safe). CUDA runs the Triton kernels (`kernels.lora`); CPU the torch references.

Dimension legend: T tokens, S slots (max_loras), R max_lora_rank, L slices, N_l slice width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref


@dataclass
class LoRABatch:
    """This step's token -> adapter slot mapping, in persistent device buffers."""

    token_slots: torch.Tensor  # [max_tokens] int32, -1: no adapter (torch reference path)
    sorted_token_ids: torch.Tensor  # [max_tokens] int32, tokens grouped by slot (kernel path)
    # [max_lora_tiles(max_tokens, S), 3] int32: row tiles (slot, start, end) of the segments
    # in sorted_token_ids, then (-1, 0, 0) (`kernels.lora.fill_lora_tiles`)
    tiles: torch.Tensor
    # False skips the LoRA math for a step without adapters; always True on CUDA, where a
    # captured graph must contain the kernels (an adapter-free replay finds empty segments).
    active: bool = False
    # Triton kernels (CUDA; on CPU only under TRITON_INTERPRET, for tests), else the references.
    kernels: bool = False
    # Host count of this step's tiles: eager launches size their grids to it. Ignored while a
    # CUDA graph is captured (the graph launches the bound for its token count).
    num_tiles: int | None = None


class LoRALinear(nn.Module):
    """`base` plus per-slot LoRA deltas on its output slices (`slice_sizes` sum to its width)."""

    def __init__(self, base: nn.Module, in_features: int, slice_sizes: list[int],
                 num_slots: int, max_rank: int, batch: LoRABatch,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        weight = next(base.parameters())
        # The activation dtype (a quantized base layer's weight dtype is not it).
        like = {"dtype": dtype or weight.dtype, "device": weight.device}
        self.base = base
        self.slice_sizes = slice_sizes
        self.max_rank = max_rank
        self.batch = batch
        L, S, R = len(slice_sizes), num_slots, max_rank  # noqa: N806
        # Plain tensors, not buffers: not part of the model's state, written only by set_slot.
        self.lora_a = torch.zeros(S, L * R, in_features, **like)
        self.lora_b = torch.zeros(S, sum(slice_sizes), R, **like)

    def set_slot(self, slot: int, weights: list[tuple[torch.Tensor, torch.Tensor] | None]
                 ) -> None:
        """Write one adapter's (A [r, in], scaled B [n, r]) per slice into `slot`; None: zero."""
        R = self.max_rank  # noqa: N806
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        offset = 0
        for i, (ab, n) in enumerate(zip(weights, self.slice_sizes, strict=True)):
            if ab is not None:
                a, b = ab
                r = a.shape[0]
                self.lora_a[slot, i * R: i * R + r].copy_(a, non_blocking=True)
                self.lora_b[slot, offset: offset + n, :r].copy_(b, non_blocking=True)
            offset += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus each token's adapter delta: x [T, in] -> y [T, sum N_l]."""
        y = self.base(x)
        batch = self.batch
        if not batch.active:
            return y
        if batch.kernels:
            ids, tiles = batch.sorted_token_ids, batch.tiles
            num_tiles = None if x.is_cuda and torch.cuda.is_current_stream_capturing() \
                else batch.num_tiles
            if num_tiles == 0:
                return y  # no token of this (eager) step has an adapter
            t = lora_shrink(x, self.lora_a, ids, tiles, num_tiles)  # fp32 [P, T, L*R] partials
            lora_expand(y, t, self.lora_b, ids, tiles, self.slice_sizes, num_tiles=num_tiles)
            return y
        slots = batch.token_slots[: x.shape[0]]
        t = lora_shrink_ref(x, self.lora_a, slots)
        lora_expand_ref(y, t, self.lora_b, slots, self.slice_sizes)
        return y


# packed module (relative to a decoder layer) -> the PEFT module names of its output slices
LORA_PACKED_TARGETS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


def wrap_lora_layers(model: nn.Module, shapes: dict[str, tuple[int, int]], num_slots: int,
                     max_rank: int, batch: LoRABatch, dtype: torch.dtype
                     ) -> list[dict[str, LoRALinear]]:
    """Replace the target modules of every decoder layer; returns, per layer, target -> wrapper.

    `shapes`: PEFT module name -> (in_features, out_features) (`lora_module_shapes`).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.mlp, "down_proj")
                                 for layer in layers):
        raise NotImplementedError(f"LoRA supports the dense Llama family (Llama, Qwen2, Qwen3), "
                                  f"not {type(model).__name__}")
    wrapped = []
    for layer in layers:
        per_layer = {}
        for target, names in LORA_PACKED_TARGETS.items():
            parent_name, attr = target.split(".")
            parent = getattr(layer, parent_name)
            wrapper = LoRALinear(getattr(parent, attr), shapes[names[0]][0],
                                 [shapes[n][1] for n in names], num_slots, max_rank, batch,
                                 dtype)
            setattr(parent, attr, wrapper)
            per_layer[target] = wrapper
        wrapped.append(per_layer)
    return wrapped
