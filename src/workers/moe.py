"""`FusedMoE`: the routed experts of one sparse MoE block.

Given router logits, each token takes its top-k experts: softmax over all E experts in fp32, top-k,
then (when the model asks, `renormalize`) the k weights are rescaled to sum to one. Mixtral always
renormalizes; Qwen2/Qwen3-MoE follow `norm_topk_prob`. The experts are SwiGLU MLPs stored stacked:

    w13_weight [E, 2I, H]   rows [0, I) gate_proj, rows [I, 2I) up_proj of each expert
    w2_weight  [E, H, I]    down_proj of each expert

Checkpoints hold one tensor per expert and projection (`experts.{e}.gate_proj.weight`, ...); the
loader maps them here with shard id (e, j), j = 0 gate, 1 up, None down (`EXPERT_SHARDS`), and
`weight_loader` copies each into its slice. On CUDA the fused Triton kernels run
(`kernels.moe.fused_experts`); elsewhere (CPU tests) the torch reference.

Expert parallelism (`--enable-expert-parallel`) will shard E across the tensor-parallel group
(issue #13); with tensor_parallel_size 1 every rank is the only rank and holds all experts.

Dimension legend:
    T tokens, E experts, K experts per token (top-k), H hidden size, I expert intermediate size
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.moe import fused_experts, fused_experts_ref

# Checkpoint projection name -> (stacked parameter, row block): gate and up share w13_weight.
EXPERT_SHARDS: dict[str, tuple[str, int | None]] = {
    "gate_proj": ("w13_weight", 0),
    "up_proj": ("w13_weight", 1),
    "down_proj": ("w2_weight", None),
}


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (fp32 weights [T, K], int32 expert ids [T, K])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


class FusedMoE(nn.Module):
    """Top-k routing plus E stacked SwiGLU experts; forward(hidden, router_logits) -> [T, H]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool) -> None:
        super().__init__()
        assert 1 <= top_k <= num_experts, (top_k, num_experts)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.w13_weight = self._param((num_experts, 2 * intermediate_size, hidden_size), (0, 1))
        self.w2_weight = self._param((num_experts, hidden_size, intermediate_size), (None,))

    def _param(self, shape: tuple[int, int, int], parts: tuple[int | None, ...]) -> nn.Parameter:
        # torch.empty: the loader overwrites every expert; dtype/device come from the context.
        # `expected_shards` tells the loader which (expert, part) tensors must all arrive.
        param = nn.Parameter(torch.empty(*shape), requires_grad=False)
        param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        param.expected_shards = {(e, j) for e in range(shape[0])  # type: ignore[attr-defined]
                                 for j in parts}
        return param

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[int, int | None]) -> None:
        """Copy expert e's gate (j=0), up (j=1) or down (j=None) projection into its slice."""
        expert, j = shard_id
        target = param.data[expert]
        if j is not None:
            size = self.intermediate_size
            target = target.narrow(0, j * size, size)
        if target.shape != loaded_weight.shape:
            raise ValueError(f"shape mismatch: expert slice {tuple(target.shape)}, "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        target.copy_(loaded_weight)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] -> weighted sum of the top-k experts [T, H]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if hidden.is_cuda:
            return fused_experts(hidden, self.w13_weight, self.w2_weight, weights, ids)
        return fused_experts_ref(hidden, self.w13_weight, self.w2_weight, weights, ids)
