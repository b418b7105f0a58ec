"""Qwen2-VL: a ViT vision tower whose merged patch embeddings replace placeholder tokens in the
prompt of a Qwen2 decoder that uses M-RoPE (3D rotary positions).

Vision tower (`VisionTransformer`), per item (an image, or a video clip of frames):
    pixel rows [N, C*Tp*P*P]  (frontend/multimodal.py makes them; N = t*h*w patches, ordered so
                               each run of m*m rows is one merge window)
    -> patch embed (the checkpoint's Conv3d with stride = kernel, applied as one matmul) [N, E]
    -> `depth` pre-norm blocks: attention within each frame (h*w patches) with 2D rotary over
       (row, col) of the patch, quick-GELU MLP
    -> merger: LayerNorm, concatenate each m*m window, MLP -> [N / m^2, H] (H = the LM hidden)

M-RoPE: each prompt token has three positions (temporal, height, width). Text tokens have all
three equal and consecutive; the tokens of an item with merged grid (t, h', w') starting at
position s get (s + i_t, s + i_h, s + i_w), and the text after it continues at s + max(h', w').
The rotary frequencies are split into three sections (`mrope_section`), each rotated by one of the
three positions. Generated tokens continue at `index + mrope_delta` on all three axes; with equal
axes M-RoPE is plain RoPE, so decode steps (and their CUDA graphs) pass ordinary [T] positions.

Dimension legend:
    N patches, L merged tokens (N / m^2), T tokens in the step
    C channels, Tp temporal patch size, P patch size, m spatial merge size
    E vision embed dim, Hv vision heads, Dv vision head dim, H text hidden size, D text head dim
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.rotary import rotary_embedding, rotary_embedding_ref
from workers.layers import LayerNorm, Linear, LMHead, RotaryEmbedding, default_weight_loader
from workers.models.llama import DecoderArgs, DecoderModel, LlamaForCausalLM
from workers.parallel import SINGLE, TPGroup


class MRotaryEmbedding(RotaryEmbedding):
    """RoPE over positions [T] (plain) or [3, T] (M-RoPE: one frequency section per axis)."""

    def __init__(self, head_dim: int, max_position: int, params: dict,
                 mrope_section: list[int]) -> None:
        super().__init__(head_dim, max_position, {**params, "rope_type": "default"})
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 "
                             f"({head_dim // 2})")
        self.mrope_section = list(mrope_section)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by positions [T] or [3, T]."""
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        # Gather each axis' angles, keep section i from axis i % 3: a per-token table [T, D/2]
        # that the ordinary rotary op then indexes with 0..T-1.
        cos3, sin3 = self.cos_cache[positions], self.sin_cache[positions]  # [3, T, D/2]
        cos = torch.cat([c[i % 3] for i, c in enumerate(cos3.split(self.mrope_section, -1))], -1)
        sin = torch.cat([s[i % 3] for i, s in enumerate(sin3.split(self.mrope_section, -1))], -1)
        index = torch.arange(positions.shape[1], device=positions.device)
        if q.is_cuda:
            return rotary_embedding(q, k, index, cos.contiguous(), sin.contiguous(), inplace=True)
        return rotary_embedding_ref(q, k, index, cos, sin)


# ---------------------------------------------------------------- vision tower


class VisionAttention(nn.Module):
    """Bidirectional attention within each frame, 2D rotary on q and k."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seg_lens: list[int]) -> torch.Tensor:
        """x [N, E], cos/sin [N, Dv] fp32, seg_lens: patches per frame -> [N, E]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate_vision(q, cos, sin), _rotate_vision(k, cos, sin)  # [N, Hv, Dv]
        outs = []
        for qs, ks, vs in zip(q.split(seg_lens), k.split(seg_lens), v.split(seg_lens),
                              strict=True):
            out = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1),
                                                 vs.transpose(0, 1))  # [Hv, n_seg, Dv]
            outs.append(out.transpose(0, 1).reshape(-1, self.num_heads * self.head_dim))
        return self.proj(torch.cat(outs))


def _rotate_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # In fp32, as the reference does, then back to the activation dtype.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = nn.Module()
        self.mlp.fc1 = Linear(dim, mlp_dim, bias=True)
        self.mlp.fc2 = Linear(mlp_dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seg_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seg_lens)
        h = self.mlp.fc1(self.norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))  # quick GELU


class VisionTransformer(nn.Module):
    """Pixel patch rows of several items -> their merged embeddings [sum L, H]."""

    def __init__(self, vcfg: dict, text_hidden: int) -> None:
        super().__init__()
        if vcfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise NotImplementedError(f"vision hidden_act {vcfg['hidden_act']!r}")
        dim, heads = vcfg["embed_dim"], vcfg["num_heads"]
        self.merge = vcfg.get("spatial_merge_size", 2)
        c = vcfg.get("in_channels", 3)
        tp, p = vcfg.get("temporal_patch_size", 2), vcfg.get("patch_size", 14)
        self.patch_embed = nn.Module()
        # The checkpoint's Conv3d weight [E, C, Tp, P, P]; stride == kernel, so it is a matmul.
        self.patch_embed.proj = nn.Module()
        weight = nn.Parameter(torch.empty(dim, c, tp, p, p), requires_grad=False)
        weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        self.patch_embed.proj.weight = weight
        self.blocks = nn.ModuleList(
            VisionBlock(dim, heads, int(dim * vcfg.get("mlp_ratio", 4))) for _ in
            range(vcfg["depth"]))
        merged = dim * self.merge ** 2
        self.merger = nn.Module()
        self.merger.ln_q = LayerNorm(dim, eps=1e-6)
        self.merger.mlp = nn.ModuleList([Linear(merged, merged, bias=True), nn.GELU(),
                                         Linear(merged, text_hidden, bias=True)])
        theta = (vcfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        quarter = torch.arange(0, dim // heads // 2, 2, dtype=torch.float32) / (dim // heads // 2)
        self.inv_freq = nn.Buffer(1.0 / theta ** quarter, persistent=False)  # [Dv/4]

    def forward(self, pixels: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        """pixels [N, C*Tp*P*P], grids: (t, h, w) in patches per item -> [N / m^2, H]."""
        w = self.patch_embed.proj.weight
        x = F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))  # [N, E]
        pos = torch.from_numpy(vision_positions(grids, self.merge)).to(x.device)  # [N, 2]
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, Dv/2]: h | w
        freqs = torch.cat((freqs, freqs), -1)
        cos, sin = freqs.cos(), freqs.sin()
        seg_lens = [h * wd for t, h, wd in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, seg_lens)
        x = self.merger.ln_q(x).reshape(-1, w.shape[0] * self.merge ** 2)
        for layer in self.merger.mlp:
            x = layer(x)
        return x


def vision_positions(grids: list[list[int]], merge: int) -> np.ndarray:
    """(row, col) of every patch [N, 2], patches ordered window by window (m x m)."""
    out = []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


# ---------------------------------------------------------------- the model


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    """Qwen2 decoder with M-RoPE, plus the vision tower that `encode` runs."""

    always_qkv_bias = True
    uses_mrope = True

    supports_aux_hidden = False  # its own forward (M-RoPE): no EAGLE-3 aux states

    def __init__(self, hf_config: dict, tp: TPGroup = SINGLE) -> None:
        nn.Module.__init__(self)
        if tp.size > 1:
            raise NotImplementedError("tensor_parallel_size > 1 is not supported for Qwen2-VL "
                                      "yet (its vision tower is not sharded)")
        self.args = DecoderArgs.from_hf(hf_config, always_qkv_bias=True, qk_norm=False, tp=tp)
        section = self.args.rope.get("mrope_section")
        if section is None:
            raise ValueError("config.json: a Qwen2-VL model needs rope mrope_section")
        rotary = MRotaryEmbedding(self.args.head_dim, self.args.max_position, self.args.rope,
                                  section)
        self.model = DecoderModel(self.args, rotary_emb=rotary)
        tied = self.model.embed_tokens if self.args.tie_word_embeddings else None
        self.lm_head = LMHead(self.args.vocab_size, self.args.hidden_size, tied_to=tied)
        self.ignored_weights = {"lm_head.weight"} if tied is not None else set()
        self.visual = VisionTransformer(hf_config["vision_config"], self.args.hidden_size)
        self.spatial_merge_size = self.visual.merge

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, H]), positions [T] or [3, T] -> hidden [T, H]."""
        return self.model(input_ids, positions, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] (placeholders are overwritten by the caller)."""
        return self.model.embed_tokens(input_ids)

    def encode(self, pixels: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        """Vision tower over one or more items -> merged embeddings [sum L, H]."""
        return self.visual(pixels, grids)

    def mrope_positions(self, num_prompt: int, items: list[tuple[int, list[int]]]
                        ) -> tuple[np.ndarray, int]:
        """M-RoPE positions [3, num_prompt] of a prompt and its delta for generated tokens.

        items: (offset of the first placeholder token, grid (t, h, w) in patches), in prompt
        order. Generated token i (0-based over the whole sequence) gets position i + delta.
        """
        m = self.spatial_merge_size
        out = np.empty((3, num_prompt), dtype=np.int64)
        cur = idx = 0  # next position, next token
        for offset, (t, h, w) in sorted(items):
            out[:, idx:offset] = np.arange(cur, cur + offset - idx)
            cur += offset - idx
            lt, lh, lw = t, h // m, w // m
            grid = np.stack(np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw),
                                        indexing="ij")).reshape(3, -1)
            out[:, offset:offset + grid.shape[1]] = grid + cur
            idx = offset + grid.shape[1]
            cur += max(lh, lw)
        out[:, idx:] = np.arange(cur, cur + num_prompt - idx)
        delta = int(out.max()) + 1 - num_prompt if num_prompt else 0
        return out, delta
