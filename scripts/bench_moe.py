"""MoE benchmark: engine decode speed on a Qwen3-30B-A3B-shaped model, and the fused-MoE kernel.

    python scripts/bench_moe.py                         # qwen3-30b-a3b preset, needs a GPU
    python scripts/bench_moe.py --sweep --out moe.md    # also time candidate tiles first
    python scripts/bench_moe.py --preset tiny           # CPU smoke run of every step

1. Engine: decode at batch sizes 1 and 64 after a `--context`-token prompt (median inter-token
   latency, `bench_throughput.run_latency`), random bf16 weights (load_format "dummy"), against
   the weight-read limit: a decode step must read every non-expert weight once plus the experts
   its tokens hit (expected distinct experts per layer under uniform routing:
   E * (1 - (1 - K/E)^B)), at the measured copy bandwidth.
2. Kernel: one MoE layer (`fused_experts`: align, gate_up, down, combine) for T tokens with
   uniform random top-k routing, timed as CUDA-graph replays over rotated weight copies (so L2
   cannot serve them); achieved bandwidth = bytes of the hit experts' weights + activations /
   time, next to the measured device copy bandwidth. On CPU the torch reference is timed instead
   (the numbers then only show that the script runs).

Dimension legend: T tokens, B batch size, E experts, K top-k, H hidden, I expert intermediate.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from bench_throughput import run_latency

PRESETS = {
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 1000000.0, "hidden_act": "silu",
        "eos_token_id": 2, "bos_token_id": 1,
    },
    "tiny": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1000,
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "rope_theta": 1000000.0, "hidden_act": "silu",
        "eos_token_id": 2, "bos_token_id": 1,
    },
}
KERNEL_TOKENS = (1, 8, 64, 256, 1024, 4096)
L2_FLUSH_BYTES = 256 << 20


def make_preset(name: str) -> str:
    """A checkpoint folder with the preset's config.json and the demo tokenizer (no weights)."""
    from workers.demo import build_tokenizer

    out = Path(tempfile.mkdtemp(prefix=f"bench-moe-{name}-"))
    build_tokenizer(out)
    (out / "config.json").write_text(json.dumps({**PRESETS[name], "dtype": "bfloat16"}))
    return str(out)


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts hit by `batch` tokens, each taking top_k distinct uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def weight_bytes(cfg: dict, batch: int, itemsize: int = 2) -> tuple[float, float]:
    """(bytes a decode step of `batch` tokens must read, total weight bytes)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    e, k, i = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    attn = h * d * (2 * hq + 2 * hkv) + 2 * d + 2 * h + h * e  # qkvo, q/k norm, norms, router
    lm_head = cfg["vocab_size"] * h  # the embedding is gathered row by row, not read whole
    expert = 3 * h * i
    read = layers * (attn + expected_experts(e, k, batch) * expert) + lm_head
    total = layers * (attn + e * expert) + lm_head * (1 if cfg["tie_word_embeddings"] else 2)
    return read * itemsize, total * itemsize


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write)."""
    import torch

    src = torch.empty(1 << 30 if device == "cuda" else 1 << 26, dtype=torch.uint8,
                      device=device).random_()
    dst = torch.empty_like(src)
    secs = _time(lambda: dst.copy_(src), device)
    return 2 * src.numel() / secs


def _time(fn, device: str) -> float:
    """Median seconds of one fn() call."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_engine(model: str, cfg: dict, args: argparse.Namespace) -> list[dict]:
    """Decode latency per batch size (`bench_throughput.run_latency`) with dummy weights."""
    from frontend import LLM

    llm = LLM(model, load_format="dummy", max_num_seqs=max(args.batch_sizes),
              max_model_len=args.context + args.new_tokens + 16,
              enforce_eager=args.enforce_eager)
    try:
        return [run_latency(llm, bs, args.context, args.new_tokens, cfg["vocab_size"])
                for bs in args.batch_sizes]
    finally:
        llm.shutdown()


def add_limits(rows: list[dict], cfg: dict, bandwidth: float) -> None:
    """Annotate engine rows with the weight-read limit at `bandwidth` (copy bytes/s)."""
    for row in rows:
        read, _ = weight_bytes(cfg, row["batch_size"])
        limit_s = read / (bandwidth / 2)  # a copy's bandwidth counts read + write
        row.update(weight_read_gb=read / 1e9, limit_itl_ms=limit_s * 1e3,
                   fraction_of_limit=limit_s / (row["median_itl_ms"] / 1e3))


def bench_kernel(cfg: dict, num_tokens: int, device: str, tile=None) -> dict:
    """One MoE layer for num_tokens tokens: seconds, bytes moved, achieved bytes/s."""
    import torch

    from kernels.moe import fused_experts, fused_experts_ref

    h, e = cfg["hidden_size"], cfg["num_experts"]
    k, i = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    layer_bytes = 3 * e * h * i * dtype.itemsize
    copies = max(1, min(16, math.ceil(L2_FLUSH_BYTES / layer_bytes))) if device == "cuda" else 1
    weights = [(torch.randn(e, 2 * i, h, device=device, dtype=dtype, generator=gen) * 0.02,
                torch.randn(e, h, i, device=device, dtype=dtype, generator=gen) * 0.02)
               for _ in range(copies)]
    x = torch.randn(num_tokens, h, device=device, dtype=dtype, generator=gen)
    ids = torch.rand(num_tokens, e, device=device, generator=gen).topk(k, dim=-1).indices
    ids = ids.to(torch.int32)
    topk_weights = torch.softmax(torch.rand(num_tokens, k, device=device, generator=gen), -1)
    hit = int(ids.unique().numel())
    moved = hit * 3 * h * i * dtype.itemsize + num_tokens * h * dtype.itemsize * 2
    if device == "cuda":
        from bench_kernels import graph_time  # CUDA-graph median, shared with bench_kernels

        fns = [lambda w13=w13, w2=w2: fused_experts(x, w13, w2, topk_weights, ids, tile)
               for w13, w2 in weights]
        secs = graph_time(fns) / 1e3  # ms -> s
        ref = fused_experts_ref(x.float(), weights[0][0].float(), weights[0][1].float(),
                                topk_weights, ids)
        err = float((fns[0]().float() - ref).norm() / ref.norm())
    else:
        w13, w2 = weights[0]
        secs = _time(lambda: fused_experts_ref(x, w13, w2, topk_weights, ids), device)
        err = 0.0
    return dict(tokens=num_tokens, experts_hit=hit, us=secs * 1e6, mb_moved=moved / 1e6,
                gb_s=moved / secs / 1e9, rel_err=err)


SWEEP_TILES = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 4), (16, 128, 64, 4, 3),
               (32, 64, 64, 4, 4), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3),
               (128, 128, 64, 8, 3)]


def sweep(cfg: dict, emit) -> None:
    """Time SWEEP_TILES per token bucket; leave the fastest in kernels.moe.MOE_TILES."""
    from kernels import moe

    for bound in list(moe.MOE_TILES) + [max(KERNEL_TOKENS)]:
        best = None
        for values in SWEEP_TILES:
            tile = moe.MoeTile(*values)
            try:
                us = bench_kernel(cfg, bound, "cuda", tile)["us"]
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip it
                emit(f"sweep T={bound} {values} failed: {type(exc).__name__}")
                continue
            emit(f"sweep T={bound} {values}: {us:.1f} us")
            if best is None or us < best[0]:
                best = (us, tile)
        if bound in moe.MOE_TILES:
            moe.MOE_TILES[bound] = best[1]
        else:
            moe.MOE_TILE_LARGE = best[1]
        emit(f"chosen T<={bound}: {best[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="tune kernel tiles first (GPU)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PRESETS[args.preset]
    if device == "cpu" and args.preset != "tiny":
        ap.error("without a GPU only --preset tiny is practical")
    # The engine first: its worker must find the GPU empty (this process's CUDA cache would
    # shrink the memory it profiles).
    engine = [] if args.skip_engine else run_engine(make_preset(args.preset), cfg, args)
    bandwidth = copy_bandwidth(device)
    add_limits(engine, cfg, bandwidth)
    read1, total = weight_bytes(cfg, 1)
    results: dict = {"preset": args.preset, "device": device,
                     "copy_bandwidth_gb_s": bandwidth / 1e9, "weights_gb": total / 1e9,
                     "active_weights_gb_bs1": read1 / 1e9, "engine": engine}
    if args.sweep and device == "cuda":
        sweep(cfg, print)
    tokens = KERNEL_TOKENS if device == "cuda" else (1, 8)
    results["kernel"] = [bench_kernel(cfg, t, device) for t in tokens]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
