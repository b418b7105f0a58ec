"""Quantization benchmark on a Llama-3.1-8B-shaped model with random weights (GPU).

Two parts (`--what`):
    gemm    each linear shape of one Llama-3.1-8B layer (qkv, o, gate_up, down) at several token
            counts M: time of the bf16 GEMM vs each quantized layer's forward (activation
            quantization included), and the weight bytes read
    engine  the offline engine per method, load_format "dummy": decode latency at batch 1 and 64
            (bench_throughput's latency mode) and, with --throughput, the nano-vllm workload

Methods: bf16 (baseline), fp8 (dynamic, per-tensor weight scales), ptpc_fp8 (per-channel), int8
(compressed-tensors W8A8 checkpoint layout), gptq (4-bit, group 128), gptq-act (act-order), awq
(4-bit, group 128), kv-fp8 (bf16 weights, FP8 KV cache).

    PYTHONPATH=src python scripts/bench_quant.py --what gemm
    PYTHONPATH=src python scripts/bench_quant.py --what engine --methods bf16 fp8 gptq awq kv-fp8
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from bench_throughput import PRESETS, make_preset, run_latency, run_throughput, workload

# Quantization configs written into the dummy checkpoint's config.json (checkpoint methods).
CKPT_CONFIGS = {
    "int8": {"quant_method": "compressed-tensors", "format": "int-quantized",
             "ignore": ["lm_head"], "config_groups": {"group_0": {
                 "targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                             "strategy": "channel", "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                       "strategy": "token", "dynamic": True}}}},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
             "sym": True},
    "gptq-act": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                 "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
            "version": "gemm"},
}
ENGINE_ARGS = {"bf16": {}, "fp8": {"quantization": "fp8"},
               "ptpc_fp8": {"quantization": "ptpc_fp8"}, "kv-fp8": {"kv_cache_dtype": "fp8"}}
METHODS = ["bf16", "fp8", "ptpc_fp8", "int8", "gptq", "gptq-act", "awq", "kv-fp8"]


def model_dir(method: str) -> str:
    """A dummy Llama-3.1-8B checkpoint folder whose config.json carries `method`'s config."""
    path = Path(make_preset("llama-3.1-8b"))
    if method in CKPT_CONFIGS:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = CKPT_CONFIGS[method]
        (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def bench_gemm(methods: list[str], token_counts: list[int], preset: str = "llama-3.1-8b",
               device: str = "cuda") -> list[dict]:
    """Time one layer's linears per method (CUDA: triton do_bench, median; CPU: a smoke run)."""
    import time

    import torch
    import triton.testing

    from workers import quant
    from workers.layers import Linear, MergedLinear, QKVLinear

    p = PRESETS[preset]
    h, i, d = p["hidden_size"], p["intermediate_size"], p["head_dim"]
    shapes = {"qkv": lambda: QKVLinear(h, d, p["num_attention_heads"], p["num_key_value_heads"]),
              "o": lambda: Linear(h, h), "gate_up": lambda: MergedLinear(h, [i, i]),
              "down": lambda: Linear(i, h)}
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for method in [m for m in methods if m != "kv-fp8"]:
        for name, make in shapes.items():
            layer, k = _build_layer(method, make, quant, gen, device)
            weight_bytes = sum(t.numel() * t.element_size() for t in layer.parameters())
            weight_bytes += sum(getattr(layer, a).numel() * getattr(layer, a).element_size()
                                for a in ("zeros", "gidx", "weight_scale_n")
                                if getattr(layer, a, None) is not None)
            for m in token_counts:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                with torch.inference_mode():
                    if device == "cuda":
                        ms = triton.testing.do_bench(functools.partial(layer, x), warmup=25,
                                                     rep=100)
                    else:
                        start = time.perf_counter()
                        layer(x)
                        ms = (time.perf_counter() - start) * 1e3
                rows.append({"method": method, "layer": name, "M": m, "us": ms * 1e3,
                             "weight_MB": weight_bytes / 2**20,
                             "weight_GB_s": weight_bytes / (ms * 1e-3) / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _build_layer(method: str, make, quant, gen, device: str):
    """(the layer of `method` with random weights, its in_features)."""
    import torch

    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        try:
            holder = torch.nn.Module()
            holder.proj = make()
            if method != "bf16":
                name = {"int8": "compressed-tensors", "gptq-act": "gptq"}.get(method, method)
                hf_config = {"quantization_config": CKPT_CONFIGS.get(method, {})}
                quant.quantize_model(holder, quant.get_quant_method(name, hf_config), hf_config)
        finally:
            torch.set_default_dtype(torch.float32)
    for param in holder.parameters():
        if param.is_floating_point() and param.element_size() > 1:
            param.data.uniform_(-1e-2, 1e-2, generator=gen)
    quant.init_dummy_weights(holder, gen)
    quant.finalize_quantization(holder)
    layer = holder.proj.requires_grad_(False)
    return layer, getattr(layer, "in_features", None) or layer.weight.shape[1]


def bench_engine(methods: list[str], args) -> list[dict]:
    """Decode latency (and throughput) of the whole engine per method."""
    from frontend import LLM

    results = []
    for method in methods:
        llm = LLM(model_dir(method), load_format="dummy", max_model_len=args.max_model_len,
                  max_num_seqs=256, enforce_eager=args.enforce_eager,
                  **ENGINE_ARGS.get(method, {}))
        try:
            row = {"method": method, "num_gpu_blocks": llm.engine.ready.num_blocks}
            row["latency"] = [run_latency(llm, bs, args.context, args.new_tokens,
                                          PRESETS["llama-3.1-8b"]["vocab_size"])
                              for bs in args.batch_sizes]
            if args.throughput:
                reqs = workload(args.num_prompts, 100, 1024, 0)
                row["throughput"] = run_throughput(llm, reqs)
        finally:
            llm.shutdown()
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", choices=["gemm", "engine"], default="gemm")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b",
                    help="layer shapes of --what gemm")
    ap.add_argument("--device", default="cuda", help="--what gemm on cpu: a smoke run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.what == "gemm":
        results = bench_gemm(args.methods, args.tokens, args.preset, args.device)
    else:
        results = bench_engine(args.methods, args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
