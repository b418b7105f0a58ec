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

Under tensor parallelism (P ranks) the experts split one of two ways, both ending in one
all-reduce of the [T, H] output:

    TP MoE (default)  every rank holds every expert's slice of I: w13 [E, 2I/P, H], w2 [E, H, I/P];
                      each rank computes all routed pairs on its slice (row-parallel down proj)
    EP (`--enable-expert-parallel`)  rank r holds whole experts [r E/P, (r+1) E/P): w13
                      [E/P, 2I, H]; every rank routes all tokens (the router is replicated), keeps
                      the pairs of its experts and gives the others weight 0 and an id outside
                      [0, E/P), which the kernels skip (`kernels.moe`)

With one rank both are the plain layer.

Dimension legend:
    T tokens, E experts, K experts per token (top-k), H hidden size, I expert intermediate size
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.moe import fused_experts, fused_experts_ref
from workers.parallel import SINGLE, TPGroup
from workers.parallel_layers import narrow_shard

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
                 renormalize: bool, tp: TPGroup = SINGLE, expert_parallel: bool = False) -> None:
        super().__init__()
        assert 1 <= top_k <= num_experts, (top_k, num_experts)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp, self.expert_parallel = tp, expert_parallel and tp.size > 1
        # This rank's experts [expert_start, +local_experts) and slice of I [inter_start, +I').
        self.expert_start, self.local_experts = 0, num_experts
        self.inter_start, self.intermediate_size = 0, intermediate_size
        self.full_intermediate_size = intermediate_size
        if self.expert_parallel:
            self.expert_start, self.local_experts = tp.shard(num_experts, "num_experts")
        else:
            self.inter_start, self.intermediate_size = tp.shard(intermediate_size,
                                                                "moe_intermediate_size")
        shape13 = (self.local_experts, 2 * self.intermediate_size, hidden_size)
        self.w13_weight = self._param(shape13, (0, 1))
        self.w2_weight = self._param((self.local_experts, hidden_size, self.intermediate_size),
                                     (None,))

    def _param(self, shape: tuple[int, int, int], parts: tuple[int | None, ...]) -> nn.Parameter:
        # torch.empty: the loader overwrites every expert; dtype/device come from the context.
        # `expected_shards` tells the loader which (expert, part) tensors must all arrive: all
        # E experts' (a rank skips those it does not hold), so a short checkpoint still fails.
        param = nn.Parameter(torch.empty(*shape), requires_grad=False)
        param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        param.expected_shards = {(e, j) for e in range(self.num_experts)  # type: ignore[attr-defined]
                                 for j in parts}
        return param

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[int, int | None]) -> None:
        """Copy expert e's gate (j=0), up (j=1) or down (j=None) projection into its slice
        (this rank's slice of I under TP; nothing for another rank's expert under EP)."""
        expert, j = shard_id
        expert -= self.expert_start
        if not 0 <= expert < self.local_experts:
            return
        target = param.data[expert]
        size, full = self.intermediate_size, self.full_intermediate_size
        if j is not None:
            target = target.narrow(0, j * size, size)
        # I is dim 0 of gate/up [I, H] and dim 1 of down [H, I].
        loaded_weight = narrow_shard(loaded_weight, 0 if j is not None else 1, full,
                                     self.inter_start, size)
        if target.shape != loaded_weight.shape:
            raise ValueError(f"shape mismatch: expert slice {tuple(target.shape)}, "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        target.copy_(loaded_weight)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] -> weighted sum of the top-k experts [T, H]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if self.expert_parallel:
            ids = ids - self.expert_start
            mine = (ids >= 0) & (ids < self.local_experts)
            ids = ids.masked_fill(~mine, -1)
            weights = weights.masked_fill(~mine, 0.0)
        if hidden.is_cuda:
            out = fused_experts(hidden, self.w13_weight, self.w2_weight, weights, ids)
        else:
            out = fused_experts_ref(hidden, self.w13_weight, self.w2_weight, weights, ids)
        return self.tp.all_reduce(out)
