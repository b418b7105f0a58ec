"""`MTPLlama`: the multi-token-prediction layer a target checkpoint ships, as a draft head.

    entry at position i:  e = enorm(embed(token_{i+1}))    (zeroed at position 0, as vLLM does)
                          h = eh_proj(cat[e, hnorm(target_hidden_i)])               (2H -> H)
                          h_out = decoder layer(h) (the target's own layer type, + residual)
                          logits = shared_head.head(shared_head.norm(h_out))  -> token_{i+2}

target_hidden_i is the target's final hidden state (after its final norm: what the runner's
forward returns, and what vLLM passes its MTP layers).

Checkpoint (DeepSeek-V3 / GLM-4.5 naming): the target's config.json has
`num_nextn_predict_layers` N >= 1 and its MTP layer i lives under `model.layers.{L + i}.`:
`enorm.weight`, `hnorm.weight`, `eh_proj.weight` [H, 2H], `shared_head.norm.weight`, optional
`shared_head.head.weight` (else the target's lm_head), optional `embed_tokens.weight` (else the
target's), plus an ordinary decoder layer (`self_attn.*`, `mlp.*`, `input_layernorm`,
`post_attention_layernorm`). The target's loader skips that prefix (`ignored_weight_prefixes`).

Every draft runs the first MTP layer, feeding back its own h_out in place of the target's hidden
state (with N = 1: reuse the last layer for k > N). Layers 1..N-1 are not loaded: running layer
j at draft j would need each of them to keep its own KV cache complete along the sequence.

Dimension legend: T entries, H hidden size, V vocab size.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.layers import Linear, LMHead, RMSNorm, RotaryEmbedding, VocabEmbedding
from workers.loader import load_weights
from workers.models import default_dtype, read_hf_config
from workers.models.llama import DecoderArgs, DecoderLayer, LlamaForCausalLM
from workers.spec.eagle import checkpoint_names


class SharedHead(nn.Module):
    """The MTP layer's final norm and (optional) own LM head."""

    def __init__(self, args: DecoderArgs, own_head: bool) -> None:
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = LMHead(args.vocab_size, args.hidden_size) if own_head else None


class MTPLayer(DecoderLayer):
    """A decoder layer of the target's type plus the MTP input projection and shared head."""

    def __init__(self, args: DecoderArgs, rotary_emb: RotaryEmbedding, names: set[str]) -> None:
        super().__init__(args, rotary_emb)
        h = args.hidden_size
        self.enorm = RMSNorm(h, args.rms_norm_eps)
        self.hnorm = RMSNorm(h, args.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h)
        self.shared_head = SharedHead(args, "shared_head.head.weight" in names)
        self.embed_tokens = (VocabEmbedding(args.vocab_size, h)
                             if "embed_tokens.weight" in names else None)


class MTPLlama(nn.Module):
    """The first MTP layer of a Llama / Qwen2 / Qwen3 target, run as a draft head."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, args: DecoderArgs, names: set[str]) -> None:
        super().__init__()
        self.args = args
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.max_position, args.rope)
        self.layer = MTPLayer(args, self.rotary_emb, names)
        self._target: list[nn.Module] = []  # not a submodule: its weights are the target's

    @property
    def num_layers(self) -> int:
        return 1

    def share_target(self, target: nn.Module) -> None:
        """Use `target`'s embedding and LM head where the MTP layer has none."""
        self._target = [target]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                target_hidden: torch.Tensor) -> torch.Tensor:
        """input_ids [T] (token_{i+1}), positions [T] (i), target_hidden [T, H] -> h_out [T, H]."""
        layer = self.layer
        embed = (layer.embed_tokens if layer.embed_tokens is not None
                 else self._target[0].model.embed_tokens)
        e = embed(input_ids)
        # Position 0 has no previous token in MTP training; vLLM zeroes its input there.
        e = e.masked_fill((positions == 0).unsqueeze(-1), 0.0)
        hidden = target_hidden.to(e.dtype)
        h = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(hidden)], dim=-1))
        h, residual = layer(h, None, positions)
        return h + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h_out [N, H] -> fp32 logits [N, V]."""
        shared = self.layer.shared_head
        head = shared.head if shared.head is not None else self._target[0].lm_head
        return head(shared.norm(hidden))

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim)

    def bind_kv_cache(self, kv_caches: list[torch.Tensor]) -> None:
        (cache,) = kv_caches
        self.layer.self_attn.attn.kv_cache = cache


def load_mtp(model_dir: str, target: nn.Module, dtype: torch.dtype,
             device: torch.device) -> MTPLlama:
    """Build the first MTP layer of the target checkpoint `model_dir` and load its weights."""
    hf_config = read_hf_config(model_dir)
    if not int(hf_config.get("num_nextn_predict_layers") or 0):
        raise ValueError(f"speculative_config.method 'mtp': {model_dir!r} has no "
                         "num_nextn_predict_layers in its config.json (no MTP layers)")
    if not isinstance(target, LlamaForCausalLM):
        raise ValueError(f"speculative_config.method 'mtp' supports the Llama / Qwen2 / Qwen3 "
                         f"dense family, not {type(target).__name__}")
    prefix = f"model.layers.{target.num_layers}."
    names = {n[len(prefix):] for n in checkpoint_names(model_dir) if n.startswith(prefix)}
    if "eh_proj.weight" not in names:
        raise ValueError(f"speculative_config.method 'mtp': {model_dir!r} has no "
                         f"'{prefix}eh_proj.weight' tensor")
    args = DecoderArgs.from_hf(hf_config, always_qkv_bias=target.always_qkv_bias,
                               qk_norm=target.qk_norm)
    with default_dtype(dtype), torch.device(device):
        model = MTPLlama(args, names)

    def rename(name: str) -> str | None:  # this layer's tensors only
        return "layer." + name[len(prefix):] if name.startswith(prefix) else None

    load_weights(model, model_dir, rename=rename)
    model.share_target(target)
    return model.eval().requires_grad_(False)
