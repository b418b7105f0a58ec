"""W4A16: 4-bit weights with per-group scales and zero points, 16-bit activations (GPTQ, AWQ).

Checkpoint formats (per linear layer; K in_features, N out_features, G = K / group_size):

    GPTQ (AutoGPTQ / GPTQModel, `quant_method` "gptq"; `bits` 4, `group_size`, `desc_act`,
    `sym`, `checkpoint_format` "gptq" (v1) or "gptq_v2"):
        qweight [K/8, N] int32  packed along the INPUT dim: row 8r+i in bits 4i.. of word row r
        qzeros  [G, N/8] int32  packed along the output dim: column 8c+i in bits 4i.. of word c;
                                v1 stores zero - 1 (a symmetric 4-bit zero of 8 is stored as 7)
        scales  [G, N]          fp16
        g_idx   [K] int32       group of each input row; with desc_act (act-order) a
                                permutation-ordered assignment, else k // group_size
    AWQ (AutoAWQ GEMM, `quant_method` "awq"; `bits`/`w_bit` 4, `group_size`/`q_group_size`,
    `zero_point`):
        qweight [K, N/8] int32  packed along the OUTPUT dim in AWQ's interleaved order: nibble
                                i of word c holds column 8c + AWQ_ORDER[i] (0 2 4 6 1 3 5 7)
        qzeros  [G, N/8] int32  same packing; zero points stored as is
        scales  [G, N]          fp16

Both become, after loading, the one layout `kernels.quant.w4a16_gemm` reads (qweight [K/8, N]
packed along K, zeros and scales [G, N] in the activation dtype, g_idx or None), so AWQ pays its
repacking once at load and both share the GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.quant import pack_int4_rows, unpack_int4_rows, w4a16_gemm, w4a16_gemm_ref
from workers.quant.linear import QuantLinear, same_for_every_shard

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_PLAIN_ORDER = tuple(range(8))


def unpack_int4_cols(packed: torch.Tensor, order: tuple[int, ...] = _PLAIN_ORDER) -> torch.Tensor:
    """[R, C/8] int32 packed along columns -> [R, C] nibbles; nibble i is column 8c + order[i]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)  # [8]
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # [R, C/8, 8], by nibble position
    inverse = [order.index(j) for j in range(8)]  # column offset j sits in nibble inverse[j]
    return nibbles[:, :, inverse].reshape(packed.shape[0], -1)


def pack_int4_cols(q: torch.Tensor, order: tuple[int, ...] = _PLAIN_ORDER) -> torch.Tensor:
    """[R, C] nibbles -> [R, C/8] int32, nibble i = column 8c + order[i] (inverse of unpack)."""
    r, c = q.shape
    q = q.to(torch.int64).reshape(r, c // 8, 8)[:, :, list(order)]  # by nibble position
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclass
class W4A16Method:
    """GPTQ or AWQ 4-bit weights (module docstring), one dequant-GEMM for both."""

    fmt: str  # "gptq" | "awq"
    group_size: int  # -1: one group over all of K
    act_order: bool = False  # GPTQ desc_act: use g_idx
    zero_offset: int = 0  # added to stored zeros (GPTQ v1: 1)
    name: str = "w4a16"

    def _groups(self, layer: QuantLinear) -> int:
        k = layer.in_features
        size = k if self.group_size == -1 else self.group_size
        if k % size or k % 8 or layer.out_features % 8:
            raise ValueError(f"W4A16 layer {k}x{layer.out_features}: K must be a multiple of "
                             f"the group size {size} and of 8, N a multiple of 8")
        return k // size

    def create_weights(self, layer: QuantLinear) -> None:
        """The checkpoint tensors of `fmt`, with their packed axes."""
        k, n, groups = layer.in_features, layer.out_features, self._groups(layer)
        if self.fmt == "gptq":
            layer.add_param("qweight", (k // 8, n), torch.int32, out_dim=1)
            layer.add_param("g_idx", (k,), torch.int32, out_dim=None,
                            loader=same_for_every_shard("g_idx"))
        else:
            layer.add_param("qweight", (k, n // 8), torch.int32, out_dim=1, pack=8)
        layer.add_param("qzeros", (groups, n // 8), torch.int32, out_dim=1, pack=8)
        layer.add_param("scales", (groups, n), layer.dtype, out_dim=1)

    def process_weights_after_loading(self, layer: QuantLinear) -> None:
        """Convert to the kernel layout: qweight [K/8, N], zeros/scales [G, N], g_idx | None."""
        order = AWQ_ORDER if self.fmt == "awq" else _PLAIN_ORDER
        zeros = unpack_int4_cols(layer.qzeros.data, order) + self.zero_offset
        if self.fmt == "awq":
            layer.qweight.data = pack_int4_rows(unpack_int4_cols(layer.qweight.data, order))
        layer.add_buffer("zeros", zeros.to(layer.dtype).contiguous())
        layer.scales.data = layer.scales.data.contiguous()
        layer.group_size_k = layer.in_features // self._groups(layer)
        gidx = None
        if self.fmt == "gptq" and self.act_order:
            gidx = layer.g_idx.data.to(torch.int32).contiguous()
            if int(gidx.min()) < 0 or int(gidx.max()) >= zeros.shape[0]:
                raise ValueError(f"g_idx values must lie in [0, {zeros.shape[0]})")
        layer.add_buffer("gidx", gidx)
        del layer.qzeros

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> y [M, N]: Triton dequant-GEMM on CUDA, the reference on CPU."""
        gemm = w4a16_gemm if x.is_cuda else w4a16_gemm_ref
        return gemm(x.contiguous(), layer.qweight, layer.scales, layer.zeros, layer.gidx,
                    layer.group_size_k, layer.bias)


def dequantize_w4(layer: QuantLinear) -> torch.Tensor:
    """The layer's weight as [N, K] fp32 (the nn.Linear layout), for tests and debugging."""
    q = unpack_int4_rows(layer.qweight.data).float()
    g = (layer.gidx.long() if layer.gidx is not None
         else torch.arange(q.shape[0], device=q.device) // layer.group_size_k)
    return ((q - layer.zeros.float()[g]) * layer.scales.float()[g]).t()


def gptq_method(quant_config: dict) -> W4A16Method:
    """A GPTQ `quantization_config` dict -> its method; clear errors for what is unsupported."""
    bits = quant_config.get("bits", 4)
    if bits != 4:
        raise ValueError(f"gptq: only 4-bit weights are supported, got bits={bits}")
    fmt = quant_config.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return W4A16Method("gptq", int(quant_config.get("group_size", 128)),
                       act_order=bool(quant_config.get("desc_act", False)),
                       zero_offset=1 if fmt == "gptq" else 0, name="gptq")


def awq_method(quant_config: dict) -> W4A16Method:
    """An AWQ `quantization_config` dict -> its method."""
    bits = quant_config.get("bits", quant_config.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"awq: only 4-bit weights are supported, got bits={bits}")
    if not quant_config.get("zero_point", True):
        raise ValueError("awq: zero_point=false checkpoints are not supported")
    version = str(quant_config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq: version {version!r} is not supported (gemm)")
    group = quant_config.get("group_size", quant_config.get("q_group_size", 128))
    return W4A16Method("awq", int(group), name="awq")
