"""`Eagle3Llama`: an EAGLE-3 draft head, loaded from the EAGLE-3 checkpoint layout.

    entry at position i:  g = fc(cat[aux_a_i, aux_b_i, aux_c_i])      (target's aux states, 3H)
                          x = cat[input_layernorm(embed(token_{i+1})), hidden_norm(g)]   (2H)
                          h = g + attn(x); h_out = h + mlp(post_attention_layernorm(h))
                          logits = lm_head(norm(h_out)) over the draft vocabulary
                          draft token = d + d2t[d] for d = argmax (a target vocabulary id)

aux_l_i is the residual stream entering target layer l at position i (HF's
`output_hidden_states[l]`), for the layer ids of `eagle_config.eagle_aux_hidden_state_layer_ids`
(default (2, L // 2, L - 3), as vLLM and the EAGLE-3 reference pick them). For draft 2..k the
head feeds back its own pre-norm h_out in place of g (no fc), as the reference does.

Checkpoint (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): a Llama config.json with
num_hidden_layers 1 (`draft_vocab_size`, `target_hidden_size` optional) and tensors
`fc.weight` [H, 3H], `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`,
`midlayer.self_attn.{q,k,v}_proj.weight` [*, 2H], `midlayer.self_attn.o_proj.weight`,
`midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`, `lm_head.weight` [draft V, H],
`d2t` int64 [draft V] and `t2d` bool [V] (unused: d2t is the map we need); `embed_tokens` is
optional (the target's otherwise). Speculators-style names (`layers.0.` for `midlayer.`, a
`model.` prefix) load too.

Dimension legend: T entries, H hidden size, V target vocab, Vd draft vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.layers import Linear, LMHead, RMSNorm, RotaryEmbedding, VocabEmbedding
from workers.loader import load_weights
from workers.models import default_dtype, read_hf_config
from workers.models.llama import DecoderArgs, DecoderLayer, LlamaForCausalLM
from workers.parallel_layers import QKVParallelLinear
from workers.spec.eagle import checkpoint_names


class Eagle3Llama(nn.Module):
    """EAGLE-3 head over a flat batch; uses the target's embedding unless it has its own."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    ignored_weights = {"t2d"}

    def __init__(self, hf_config: dict, names: set[str], num_aux: int) -> None:
        super().__init__()
        self.args = args = DecoderArgs.from_hf(hf_config, always_qkv_bias=False, qk_norm=False)
        if args.num_layers != 1:
            raise ValueError(f"EAGLE-3 head: num_hidden_layers must be 1, got {args.num_layers}")
        h, d = args.hidden_size, args.head_dim
        self.draft_vocab_size = int(hf_config.get("draft_vocab_size") or args.vocab_size)
        if self.draft_vocab_size != args.vocab_size and "d2t" not in names:
            raise ValueError(f"EAGLE-3 head: draft_vocab_size {self.draft_vocab_size} != "
                             f"vocab_size {args.vocab_size} but the checkpoint has no 'd2t' "
                             "tensor (the draft -> target token map)")
        self.rotary_emb = RotaryEmbedding(d, args.max_position, args.rope)
        self.midlayer = DecoderLayer(args, self.rotary_emb)
        # q/k/v read cat[normed embedding, normed hidden]: 2H inputs.
        self.midlayer.self_attn.qkv_proj = QKVParallelLinear(2 * h, d, args.num_heads,
                                                             args.num_kv_heads,
                                                             bias=args.qkv_bias)
        self.midlayer.hidden_norm = RMSNorm(h, args.rms_norm_eps)
        target_h = int(hf_config.get("target_hidden_size") or h)
        self.fc = Linear(num_aux * target_h, h, bias="fc.bias" in names)
        self.norm = RMSNorm(h, args.rms_norm_eps)
        self.lm_head = (LMHead(self.draft_vocab_size, h) if "lm_head.weight" in names else None)
        self.embed_tokens = (VocabEmbedding(args.vocab_size, h)
                             if "embed_tokens.weight" in names else None)
        self.d2t = (nn.Parameter(torch.zeros(self.draft_vocab_size, dtype=torch.int64),
                                 requires_grad=False) if "d2t" in names else None)
        if self.d2t is not None:
            self.d2t.weight_loader = _load_d2t  # type: ignore[attr-defined]
        self._target: list[nn.Module] = []  # not a submodule: its weights are the target's

    @property
    def num_layers(self) -> int:
        return 1

    def share_target(self, target: nn.Module) -> None:
        """Use `target`'s embedding (and LM head, same vocabulary only) where the checkpoint
        has none."""
        if self.lm_head is None and self.draft_vocab_size != self.args.vocab_size:
            raise ValueError("EAGLE-3 head: no 'lm_head.weight' for its draft vocabulary")
        self._target = [target]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                target_hidden: torch.Tensor) -> torch.Tensor:
        """input_ids [T] (token_{i+1}), positions [T] (i), target_hidden [T, 3H] (the target's
        aux states) or [T, H] (the head's own previous output) -> pre-norm h_out [T, H]."""
        embed = (self.embed_tokens if self.embed_tokens is not None
                 else self._target[0].model.embed_tokens)
        layer = self.midlayer
        hidden = target_hidden.to(embed.weight.dtype)
        if hidden.shape[-1] != self.args.hidden_size:
            hidden = self.fc(hidden)
        x = torch.cat([layer.input_layernorm(embed(input_ids)), layer.hidden_norm(hidden)], -1)
        x = layer.self_attn(x, positions)
        x, residual = layer.post_attention_layernorm(x, hidden)
        return layer.mlp(x) + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h_out [N, H] -> fp32 logits over the draft vocabulary [N, Vd]."""
        head = self.lm_head if self.lm_head is not None else self._target[0].lm_head
        return head(self.norm(hidden))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids [N] -> target-vocabulary ids [N] (d + d2t[d])."""
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim)

    def bind_kv_cache(self, kv_caches: list[torch.Tensor]) -> None:
        (cache,) = kv_caches
        self.midlayer.self_attn.attn.kv_cache = cache


def _load_d2t(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if loaded.shape != param.shape or loaded.dtype.is_floating_point:
        raise ValueError(f"need an integer tensor of shape {tuple(param.shape)}, got "
                         f"{loaded.dtype} {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _rename(name: str) -> str:
    # Speculators-style heads: "model." prefix, "layers.0." for the one decoder layer.
    name = name.removeprefix("model.")
    return "midlayer." + name[len("layers.0."):] if name.startswith("layers.0.") else name


def aux_layer_ids(hf_config: dict, target_layers: int) -> tuple[int, ...]:
    """The target layers whose input residual stream the head reads (config or default)."""
    ids = (hf_config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids:
        return tuple(int(i) for i in ids)
    return (2, target_layers // 2, target_layers - 3)


def load_eagle3(model_dir: str, target: nn.Module, dtype: torch.dtype,
                device: torch.device) -> Eagle3Llama:
    """Build and load an EAGLE-3 head from `model_dir`; make `target` output its aux states."""
    if not getattr(target, "supports_aux_hidden", False):
        raise ValueError(f"speculative_config.method 'eagle3': the target "
                         f"{type(target).__name__} cannot output auxiliary hidden states "
                         "(supported: Llama / Qwen2 / Qwen3 and their MoE models)")
    hf_config = read_hf_config(model_dir)
    names = {_rename(n) for n in checkpoint_names(model_dir)}
    if "fc.weight" not in names:
        raise ValueError(f"{model_dir!r} is not an EAGLE-3 head: no 'fc.weight' tensor")
    ids = aux_layer_ids(hf_config, target.num_layers)
    target.enable_aux_hidden(ids)
    with default_dtype(dtype), torch.device(device):
        model = Eagle3Llama(hf_config, names, len(ids))
    load_weights(model, model_dir, rename=_rename)
    if model.d2t is not None:
        mapped = torch.arange(model.draft_vocab_size, device=device) + model.d2t
        if mapped.min() < 0 or mapped.max() >= model.args.vocab_size:
            raise ValueError(f"{model_dir!r}: 'd2t' maps draft ids outside the target "
                             f"vocabulary [0, {model.args.vocab_size})")
    model.share_target(target)
    return model.eval().requires_grad_(False)
