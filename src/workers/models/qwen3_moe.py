"""Mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE and Mixtral on the Llama family's pieces.

Attention, norms, rotary, the dense MLP and the forward wiring come from `models.llama`; only the
feed-forward block differs. A sparse block (`SparseMoeBlock`) is a router `gate` [E, H] and the
experts (`workers.moe.FusedMoE`); the three families differ in small switches, read once in
`MoeArgs`:

    Qwen3-MoE  q/k norm (as Qwen3); renormalize the top-k weights iff `norm_topk_prob`;
               dense MLP on `mlp_only_layers` and off the `decoder_sparse_step` grid
    Qwen2-MoE  q/k/v bias (as Qwen2); as Qwen3-MoE, plus a shared expert (a dense MLP) added to
               every token's output, scaled by sigmoid(shared_expert_gate(x))
    Mixtral    always renormalizes; every layer sparse; checkpoint names `block_sparse_moe`
               and experts' `w1`/`w3`/`w2` (gate/up/down), mapped to ours at load

Dimension legend:
    T tokens, H hidden size, E experts, I expert intermediate size, V vocab size
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from workers.layers import Linear, RMSNorm, RotaryEmbedding
from workers.models.llama import (
    DecoderArgs,
    DecoderAttention,
    DecoderLayer,
    DecoderMLP,
    DecoderModel,
    LlamaForCausalLM,
)
from workers.moe import EXPERT_SHARDS, FusedMoE
from workers.parallel import SINGLE, TPGroup
from workers.parallel_layers import ParallelLMHead, VocabParallelEmbedding


@dataclass(frozen=True)
class MoeArgs:
    """The expert-related numbers and switches of config.json."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool
    shared_intermediate_size: int  # 0: no shared expert
    sparse_layers: tuple[bool, ...]  # per layer: MoE block (True) or dense MLP

    @classmethod
    def from_hf(cls, cfg: dict, *, mixtral: bool) -> MoeArgs:
        """Read a config.json dict; accepts both `num_experts` and `num_local_experts`."""
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        num_layers = cfg["num_hidden_layers"]
        if mixtral:
            return cls(num_experts, cfg["num_experts_per_tok"], cfg["intermediate_size"], True,
                       0, (True,) * num_layers)
        dense = set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step", 1) or 1
        sparse = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0
                       for i in range(num_layers))
        return cls(num_experts, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                   bool(cfg.get("norm_topk_prob", False)),
                   cfg.get("shared_expert_intermediate_size", 0) or 0, sparse)


class SparseMoeBlock(nn.Module):
    """Router, routed experts and the optional sigmoid-gated shared expert."""

    def __init__(self, args: DecoderArgs, moe: MoeArgs) -> None:
        super().__init__()
        # The router is replicated: every rank routes every token (needed by EP, cheap for TP).
        self.gate = Linear(args.hidden_size, moe.num_experts)
        self.experts = FusedMoE(moe.num_experts, moe.top_k, args.hidden_size,
                                moe.intermediate_size, moe.renormalize, tp=args.tp,
                                expert_parallel=args.tp.expert_parallel)
        self.has_shared = moe.shared_intermediate_size > 0
        if self.has_shared:
            shared = dataclasses.replace(args, intermediate_size=moe.shared_intermediate_size)
            self.shared_expert = DecoderMLP(shared)
            self.shared_expert_gate = Linear(args.hidden_size, 1)  # replicated, as the router

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, H]."""
        out = self.experts(hidden, self.gate(hidden))  # router logits [T, E]
        if self.has_shared:
            gate = torch.sigmoid(self.shared_expert_gate(hidden))  # [T, 1]
            out = out + gate * self.shared_expert(hidden)
        return out


class MoeDecoderLayer(nn.Module):
    """`DecoderLayer` whose feed-forward block is sparse or dense as the config says."""

    def __init__(self, args: DecoderArgs, moe: MoeArgs, rotary_emb: RotaryEmbedding,
                 sparse: bool) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(args, rotary_emb)
        self.mlp = SparseMoeBlock(args, moe) if sparse else DecoderMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    forward = DecoderLayer.forward  # same pre-norm residual wiring, reads self.mlp


class MoeModel(nn.Module):
    """Embedding, MoE decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, args: DecoderArgs, moe: MoeArgs) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp=args.tp)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.max_position, args.rope)
        self.layers = nn.ModuleList(MoeDecoderLayer(args, moe, self.rotary_emb, sparse)
                                    for sparse in moe.sparse_layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    forward = DecoderModel.forward


class Qwen3MoeForCausalLM(nn.Module):
    """Qwen3-MoE causal LM; the runner-facing methods are LlamaForCausalLM's."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    expert_weights_mapping = EXPERT_SHARDS
    qkv_bias = False
    qk_norm = True
    mixtral = False

    def __init__(self, hf_config: dict, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        if hf_config.get("use_sliding_window") or (self.mixtral and _window_bites(hf_config)):
            raise NotImplementedError("sliding-window attention is not supported")
        self.args = DecoderArgs.from_hf(hf_config, always_qkv_bias=self._qkv_bias(hf_config),
                                        qk_norm=self.qk_norm, tp=tp)
        self.moe = MoeArgs.from_hf(hf_config, mixtral=self.mixtral)
        self.model = MoeModel(self.args, self.moe)
        tied = self.model.embed_tokens if self.args.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(self.args.vocab_size, self.args.hidden_size, tied_to=tied,
                                      tp=tp)
        self.ignored_weights = {"lm_head.weight"} if tied is not None else set()

    def _qkv_bias(self, hf_config: dict) -> bool:
        return self.qkv_bias

    num_layers = LlamaForCausalLM.num_layers
    supports_aux_hidden = True  # EAGLE-3 targets: same forward, same aux states
    aux_layers: tuple[int, ...] = ()
    aux_hidden: torch.Tensor | None = None
    enable_aux_hidden = LlamaForCausalLM.enable_aux_hidden
    forward = LlamaForCausalLM.forward
    embed_input_ids = LlamaForCausalLM.embed_input_ids
    compute_logits = LlamaForCausalLM.compute_logits
    kv_cache_shape = LlamaForCausalLM.kv_cache_shape
    bind_kv_cache = LlamaForCausalLM.bind_kv_cache


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen2-MoE: q/k/v bias (config `qkv_bias`, default on), no q/k norm, a shared expert."""

    qk_norm = False

    def _qkv_bias(self, hf_config: dict) -> bool:
        return bool(hf_config.get("qkv_bias", True))


class MixtralForCausalLM(Qwen3MoeForCausalLM):
    """Mixtral: Mistral attention, every layer sparse, top-k weights always renormalized."""

    packed_modules_mapping = {**LlamaForCausalLM.packed_modules_mapping,
                              "block_sparse_moe": ("mlp", None)}
    expert_weights_mapping = {"w1": EXPERT_SHARDS["gate_proj"], "w3": EXPERT_SHARDS["up_proj"],
                              "w2": EXPERT_SHARDS["down_proj"]}
    qk_norm = False
    mixtral = True


def _window_bites(hf_config: dict) -> bool:
    # Mistral-style configs carry `sliding_window`; it only matters below the context length.
    window = hf_config.get("sliding_window")
    return window is not None and window < hf_config.get("max_position_embeddings", 2048)
