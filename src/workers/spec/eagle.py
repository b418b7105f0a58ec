"""`EagleLlama`: an EAGLE-1 draft head, loaded from the EAGLE checkpoint layout.

    entry at position i: fc(cat[embed(token_{i+1}), target_hidden_i]) -> decoder layer(s)
                         -> hidden_out_i (no final norm) -> target lm_head -> logits for token_{i+2}

Checkpoint (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): config.json of a Llama with
num_hidden_layers 1, and tensors `fc.weight` [H, 2H] (`fc.bias` optional),
`layers.{l}.self_attn.{q,k,v,o}_proj.weight`, `layers.{l}.mlp.{gate,up,down}_proj.weight`,
`layers.{l}.post_attention_layernorm.weight`, `layers.{l}.input_layernorm.weight` for l >= 1
only (layer 0 takes the fc output un-normed), `embed_tokens.weight` and `lm_head.weight`
optional (shared with the target model when absent, as most heads ship).

When drafting several tokens the head feeds its own hidden_out back in place of the target's
hidden state (as EAGLE does). Dimension legend: T entries, H hidden size, V vocab size.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from workers.layers import Linear, LMHead, RotaryEmbedding, VocabEmbedding
from workers.loader import checkpoint_files, load_weights
from workers.models import default_dtype, read_hf_config
from workers.models.llama import DecoderArgs, DecoderLayer, LlamaForCausalLM


class EagleLlama(nn.Module):
    """EAGLE-1 head over a flat batch; uses the target's embedding / lm_head unless it has its
    own."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, hf_config: dict, names: set[str]) -> None:
        super().__init__()
        self.args = DecoderArgs.from_hf(hf_config, always_qkv_bias=False, qk_norm=False)
        h = self.args.hidden_size
        self.rotary_emb = RotaryEmbedding(self.args.head_dim, self.args.max_position,
                                          self.args.rope)
        self.layers = nn.ModuleList(DecoderLayer(self.args, self.rotary_emb)
                                    for _ in range(self.args.num_layers))
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE-1: fc output goes in un-normed
        self.fc = Linear(2 * h, h, bias="fc.bias" in names)
        self.embed_tokens = (VocabEmbedding(self.args.vocab_size, h)
                             if "embed_tokens.weight" in names else None)
        self.lm_head = (LMHead(self.args.vocab_size, h) if "lm_head.weight" in names else None)
        self._target: list[nn.Module] = []  # not a submodule: its weights are the target's

    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    def share_target(self, target: nn.Module) -> None:
        """Use `target`'s embedding and LM head where the checkpoint has none."""
        self._target = [target]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                target_hidden: torch.Tensor) -> torch.Tensor:
        """input_ids [T] (token_{i+1}), positions [T] (i), target_hidden [T, H] -> [T, H]."""
        embed = (self.embed_tokens if self.embed_tokens is not None
                 else self._target[0].model.embed_tokens)
        hidden = self.fc(torch.cat([embed(input_ids), target_hidden.to(embed.weight.dtype)], -1))
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, V]."""
        head = self.lm_head if self.lm_head is not None else self._target[0].lm_head
        return head(hidden)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim)

    def bind_kv_cache(self, kv_caches: list[torch.Tensor]) -> None:
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            layer.self_attn.attn.kv_cache = cache


def load_eagle(model_dir: str, target: nn.Module, dtype: torch.dtype,
               device: torch.device) -> EagleLlama:
    """Build and load an EAGLE-1 head from `model_dir`, sharing `target`'s missing parts."""
    hf_config = read_hf_config(model_dir)
    names = checkpoint_names(model_dir)
    if any(n.startswith("midlayer.") or n == "d2t" for n in names):
        raise ValueError(f"{model_dir!r} is an EAGLE-3 head: use speculative_config.method "
                         "'eagle3'")
    with default_dtype(dtype), torch.device(device):
        model = EagleLlama(hf_config, names)
    load_weights(model, model_dir)
    model.share_target(target)
    return model.eval().requires_grad_(False)


def checkpoint_names(model_dir: str) -> set[str]:
    """Every tensor name of the checkpoint in `model_dir` (headers only, no data read)."""
    names: set[str] = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names
