"""The Llama decoder family: Llama, Qwen2 and Qwen3 as one model with flags.

The three differ only in small switches, read once in `DecoderArgs`:
    Llama  `attention_bias` on q/k/v/o, `mlp_bias`, optional "llama3" rope scaling
    Qwen2  bias on q/k/v always, none on o
    Qwen3  RMSNorm over each head of q and k before rope (`q_norm`/`k_norm`), explicit head_dim

Module and parameter names mirror the HF checkpoints, except for the packed projections
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) that `packed_modules_mapping` tells the loader about.

The model runs on a flat batch: all sequences' new tokens concatenated, no padding; attention finds
each sequence's boundaries and KV blocks in the forward context (`workers.attention`).

Dimension legend:
    T tokens in the step, N tokens whose logits are wanted
    H hidden size, I intermediate size, V vocab size
    Hq query heads, Hkv key/value heads, D head dim
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workers.attention import Attention
from workers.layers import RMSNorm, RotaryEmbedding, SiluAndMul, rope_parameters
from workers.parallel import SINGLE, TPGroup
from workers.parallel_layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_head_shard,
)


@dataclass(frozen=True)
class DecoderArgs:
    """The few numbers and switches of config.json that shape the model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: dict
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    # The tensor-parallel group every sharded layer splits over (one rank: nothing split).
    tp: TPGroup = field(default=SINGLE, compare=False)

    @classmethod
    def from_hf(cls, cfg: dict, *, always_qkv_bias: bool, qk_norm: bool,
                tp: TPGroup = SINGLE) -> DecoderArgs:
        """Read a config.json dict (transformers v5 or legacy spelling)."""
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} is not supported")
        num_heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position=cfg.get("max_position_embeddings", 2048),
            rope=rope_parameters(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=always_qkv_bias or attention_bias,
            o_bias=attention_bias and not always_qkv_bias,  # Qwen2: never on o_proj
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
            tp=tp,
        )


class DecoderAttention(nn.Module):
    """qkv projection, optional per-head q/k norm, rotary, paged attention, output projection.

    Under tensor parallelism q/k/v hold this rank's heads only and o_proj all-reduces.
    """

    def __init__(self, args: DecoderArgs, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        d = args.head_dim
        self.head_dim = d
        self.qkv_proj = QKVParallelLinear(args.hidden_size, d, args.num_heads, args.num_kv_heads,
                                          bias=args.qkv_bias, tp=args.tp)
        num_heads, num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # local
        self.q_size, self.kv_size = num_heads * d, num_kv_heads * d
        self.o_proj = RowParallelLinear(args.num_heads * d, args.hidden_size, bias=args.o_bias,
                                        tp=args.tp)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(num_heads, num_kv_heads, d, scale=d**-0.5)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], positions [T] -> [T, H]."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, -1, self.head_dim)  # [T, Hq, D]
        k = k.reshape(num_tokens, -1, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v)
        return self.o_proj(out)


class DecoderMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one matmul."""

    def __init__(self, args: DecoderArgs) -> None:
        super().__init__()
        size = args.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, [size, size],
                                                       bias=args.mlp_bias, tp=args.tp)
        self.down_proj = RowParallelLinear(size, args.hidden_size, bias=args.mlp_bias,
                                           tp=args.tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention block and MLP block; the residual stream travels alongside."""

    def __init__(self, args: DecoderArgs, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(args, rotary_emb)
        self.mlp = DecoderMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, residual before it) -> the same pair for the next layer."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, args: DecoderArgs, rotary_emb: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp=args.tp)
        # One cos/sin table shared by all layers; each layer rotates its q and k by `positions`.
        # A multimodal model passes its own (M-RoPE: positions [3, T]).
        self.rotary_emb = rotary_emb or RotaryEmbedding(args.head_dim, args.max_position,
                                                        args.rope)
        self.layers = nn.ModuleList(DecoderLayer(args, self.rotary_emb)
                                    for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None,
                aux_layers: tuple[int, ...] = (),
                aux_out: list[torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, H], which wins), positions [T] -> hidden [T, H].

        aux_layers: append to `aux_out` the residual stream entering each of these layers
        ([T, H] each, in layer order), as HF's output_hidden_states[i] (EAGLE-3)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for i, layer in enumerate(self.layers):
            if i in aux_layers:
                assert aux_out is not None
                aux_out.append(hidden if residual is None else hidden + residual)
            hidden, residual = layer(hidden, residual, positions)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-style causal LM over a flat token batch and a paged KV cache."""

    # checkpoint module name -> (our packed module name, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    always_qkv_bias = False
    qk_norm = False
    # EAGLE-3: layers whose input residual stream each forward also keeps (`enable_aux_hidden`);
    # empty means the plain forward, no extra work. Models whose forward is their own say no.
    supports_aux_hidden = True
    aux_layers: tuple[int, ...] = ()
    aux_hidden: torch.Tensor | None = None  # [T, len(aux_layers) * H], of the last forward

    def __init__(self, hf_config: dict, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.args = DecoderArgs.from_hf(hf_config, always_qkv_bias=self.always_qkv_bias,
                                        qk_norm=self.qk_norm, tp=tp)
        self.model = DecoderModel(self.args)
        tied = self.model.embed_tokens if self.args.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(self.args.vocab_size, self.args.hidden_size, tied_to=tied,
                                      tp=tp)
        # Some tied checkpoints still store lm_head.weight; it duplicates the embedding.
        self.ignored_weights = {"lm_head.weight"} if tied is not None else set()
        # Multi-token-prediction layers ship as model.layers.{L + i}: the MTP drafter
        # (workers/spec/mtp.py) loads them, the target skips them.
        self.ignored_weight_prefixes = tuple(
            f"model.layers.{self.args.num_layers + i}."
            for i in range(int(hf_config.get("num_nextn_predict_layers") or 0)))

    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T] int64 -> hidden [T, H]; needs a forward context.

        inputs_embeds [T, H]: the decoder's input rows, used instead of embedding input_ids.
        With `aux_layers` set, also leaves their input residual streams in `aux_hidden`."""
        if not self.aux_layers:
            return self.model(input_ids, positions, inputs_embeds)
        aux: list[torch.Tensor] = []
        hidden = self.model(input_ids, positions, inputs_embeds, self.aux_layers, aux)
        self.aux_hidden = torch.cat(aux, dim=-1)
        return hidden

    def enable_aux_hidden(self, layer_ids: tuple[int, ...]) -> None:
        """Make every forward also keep the residual stream entering `layer_ids` (EAGLE-3)."""
        if len(set(layer_ids)) != len(layer_ids) or sorted(layer_ids) != list(layer_ids) or \
                not all(0 <= i < self.num_layers for i in layer_ids):
            raise ValueError(f"eagle_aux_hidden_state_layer_ids {list(layer_ids)}: need distinct "
                             f"increasing layer ids in [0, {self.num_layers})")
        self.aux_layers = tuple(layer_ids)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> the embedding rows [T, H] the decoder would start from."""
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, H] -> fp32 logits [N, V] on TP rank 0; None on the other ranks.

        A collective under tensor parallelism: every rank calls it with the same N.
        """
        return self.lm_head(hidden)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (this rank's kv heads)."""
        num_kv_heads = kv_head_shard(self.args.num_kv_heads, self.args.tp)[1]
        return (2, num_blocks, block_size, num_kv_heads, self.args.head_dim)

    def bind_kv_cache(self, kv_caches: list[torch.Tensor]) -> None:
        """Give layer i the cache tensor kv_caches[i] (shape `kv_cache_shape`)."""
        assert len(kv_caches) == self.num_layers
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            assert cache.shape[0] == 2 and cache.shape[3:] == self.kv_cache_shape(1, 1)[3:]
            layer.self_attn.attn.kv_cache = cache


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with a bias on the q/k/v projections."""

    always_qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama with per-head RMSNorm on q and k."""

    qk_norm = True
