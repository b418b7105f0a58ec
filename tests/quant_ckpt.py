"""Tiny quantized checkpoints for the tests, written by hand from the documented formats.

`write_quantized(src, dst, method)` round-to-nearest quantizes every decoder linear weight of the
fp32 checkpoint `src` and writes two checkpoints:
    dst          the quantized one (config.json gets the method's quantization_config)
    dst + "-deq" the same model with each weight replaced by its dequantization, in fp32, so
                 an unquantized run of it is the exact reference of the weight quantization.

Methods and the tensors they write for a weight W [N, K] (formats: workers/quant/w4a16.py and
w8a8.py docstrings):
    gptq       sym 4-bit, GPTQ v1: qweight [K/8, N] packed along K, qzeros [G, N/8] (zero - 1),
               scales [G, N] fp16, g_idx [K]; act_order shuffles rows over groups (one
               permutation per layer input, shared by q/k/v and by gate/up, as GPTQ does)
    awq        asym 4-bit: qweight [K, N/8] and qzeros [G, N/8] in AWQ order, scales fp16
    ct-int8 / ct-fp8   compressed-tensors W8A8, per-channel weight scales, dynamic
               per-token activations
    ct-fp8-tensor      FP8 per-tensor weight scale, static per-tensor input_scale (given)
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kernels.quant import FP8_DTYPE, pack_int4_rows
from workers.quant.w4a16 import AWQ_ORDER, pack_int4_cols

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SAME_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu",
               "up_proj": "gu"}


def _groups_of(name: str, k: int, group: int, act_order: bool) -> torch.Tensor:
    if not act_order:
        return (torch.arange(k) // group).to(torch.int32)
    parent, _, module = name.rpartition(".weight")[0].rpartition(".")
    seed = zlib.crc32(f"{parent}.{_SAME_INPUT.get(module, module)}".encode())
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)  # row perm[i] is i-th quantized
    return g_idx


def quantize_w4(w: torch.Tensor, g_idx: torch.Tensor, sym: bool):
    """W [N, K] -> (q [K, N] 0..15, zeros [G, N] int, scales [G, N] fp16, w_hat [N, K])."""
    wt = w.t().float()  # [K, N]
    groups = int(g_idx.max()) + 1
    q = torch.empty_like(wt, dtype=torch.int32)
    zeros = torch.empty(groups, wt.shape[1], dtype=torch.int32)
    scales = torch.empty(groups, wt.shape[1], dtype=torch.float16)
    for j in range(groups):
        rows = g_idx == j
        lo, hi = wt[rows].amin(0), wt[rows].amax(0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            scale, zero = (2 * hi / 15).clamp(min=1e-8), torch.full_like(hi, 8)
        else:
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            zero = (-lo / scale.half().float()).round().clamp(0, 15)
        scales[j] = scale.half()
        zeros[j] = zero.int()
        q[rows] = (wt[rows] / scales[j].float() + zero).round().clamp(0, 15).int()
    w_hat = (q - zeros[g_idx.long()]).float() * scales[g_idx.long()].float()
    return q, zeros, scales, w_hat.t().contiguous()


def quantize_w8(w: torch.Tensor, dtype: torch.dtype, per_channel: bool):
    """W [N, K] -> (w_q [N, K], scale [N, 1] or [1] fp32, w_hat [N, K])."""
    qmax = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / qmax).float()
    s = scale if per_channel else scale.reshape(1, 1)
    y = (w / s).clamp(-qmax, qmax)
    w_q = y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)
    return w_q, scale, (w_q.float() * s).contiguous()


def _quant_config(method: str, group: int, act_order: bool) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                "sym": True, "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm"}
    kind = "int" if method == "ct-int8" else "float"
    static = method == "ct-fp8-tensor"
    weights = {"num_bits": 8, "type": kind, "symmetric": True,
               "strategy": "tensor" if static else "channel", "dynamic": False}
    inputs = {"num_bits": 8, "type": kind, "symmetric": True,
              "strategy": "tensor" if static else "token", "dynamic": not static}
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed",
            "format": f"{kind}-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": inputs}}}


def write_quantized(src: str, dst: str | Path, method: str, group: int = 16,
                    act_order: bool = False, input_scale: float = 0.05) -> tuple[str, str]:
    """Quantize checkpoint `src` into `dst` (+ the dequantized twin `dst-deq`); both paths."""
    dst, deq = Path(dst), Path(f"{dst}-deq")
    for out in (dst, deq):
        shutil.copytree(src, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {}
    for file in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    quant, deq_tensors = {}, {}
    for name, w in tensors.items():
        module = name.rpartition(".weight")[0].rpartition(".")[2]
        if not (name.endswith(".weight") and module in LINEARS):
            quant[name] = deq_tensors[name] = w
            continue
        base = name[: -len(".weight")]
        if method in ("gptq", "awq"):
            g_idx = _groups_of(name, w.shape[1], group, act_order and method == "gptq")
            q, zeros, scales, w_hat = quantize_w4(w, g_idx, sym=method == "gptq")
            if method == "gptq":
                quant |= {f"{base}.qweight": pack_int4_rows(q), f"{base}.g_idx": g_idx,
                          f"{base}.qzeros": pack_int4_cols(zeros - 1),
                          f"{base}.scales": scales}
            else:
                quant |= {f"{base}.qweight": pack_int4_cols(q, AWQ_ORDER),
                          f"{base}.qzeros": pack_int4_cols(zeros, AWQ_ORDER),
                          f"{base}.scales": scales}
        else:
            dtype = torch.int8 if method == "ct-int8" else FP8_DTYPE
            w_q, scale, w_hat = quantize_w8(w, dtype, per_channel=method != "ct-fp8-tensor")
            quant |= {name: w_q, f"{base}.weight_scale": scale}
            if method == "ct-fp8-tensor":
                quant[f"{base}.input_scale"] = torch.tensor([input_scale])
        deq_tensors[name] = w_hat
    save_file(quant, str(dst / "model.safetensors"))
    save_file(deq_tensors, str(deq / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = _quant_config(method, group, act_order)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(dst), str(deq)
