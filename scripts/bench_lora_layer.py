"""Time the LoRA wrapper of each Llama-8B projection against the bare projection (CUDA).

    PYTHONPATH=src python scripts/bench_lora_layer.py [--sweep] [--out lora_layer.md]

For every projection a decoder layer wraps (qkv, o, gate_up, down) and token counts from decode
(1-256) to prefill chunks (2,048), the base `nn.Linear` and `LoRALinear(base)` (8 slots of rank
16, tokens round-robin over the slots: every adapter in every batch) run inside CUDA graphs, as
decode steps do, and eagerly with the host-known segment length, as prefill steps do. The table
gives microseconds per call and the LoRA overhead per layer (sum of the four projections).
`--sweep` first times candidate (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) tiles for shrink and
expand, then the row tile TILE_M, at a decode and a prefill size, and runs the table with the
winners (module constants patched in place; copy them into kernels/lora.py).

Dimension legend: T tokens, S slots, R rank.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from kernels import lora as lora_kernels
from workers.lora_layers import LoRABatch, LoRALinear

DEVICE, DTYPE = "cuda", torch.bfloat16
HIDDEN, INTER = 4096, 14336
PROJECTIONS = {  # name -> (in_features, output slices)
    "qkv": (HIDDEN, [4096, 1024, 1024]),
    "o": (HIDDEN, [HIDDEN]),
    "gate_up": (HIDDEN, [INTER, INTER]),
    "down": (INTER, [HIDDEN]),
}
TOKENS = (1, 16, 64, 128, 256, 2048)


def make_batch(num_tokens: int, num_slots: int, max_tokens: int) -> LoRABatch:
    """Tokens round-robin over the slots, in the persistent-buffer layout the runner fills."""
    slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=DEVICE)
    slots[:num_tokens] = torch.arange(num_tokens, device=DEVICE, dtype=torch.int32) % num_slots
    ids, seg = lora_kernels.lora_segments(slots[:num_tokens], num_slots)
    sorted_ids = torch.zeros(max_tokens, dtype=torch.int32, device=DEVICE)
    sorted_ids[:num_tokens] = ids
    tiles = lora_kernels.lora_tiles(seg, max_tokens)
    return LoRABatch(token_slots=slots, sorted_token_ids=sorted_ids, tiles=tiles, active=True,
                     kernels=True, num_tiles=int((tiles[:, 0] >= 0).sum()))


def make_layer(name: str, batch: LoRABatch, num_slots: int, rank: int) -> tuple:
    in_features, slices = PROJECTIONS[name]
    base = torch.nn.Linear(in_features, sum(slices), bias=False, device=DEVICE, dtype=DTYPE)
    wrapped = LoRALinear(base, in_features, slices, num_slots, rank, batch, DTYPE)
    wrapped.lora_a.normal_(std=0.02)
    wrapped.lora_b.normal_(std=0.02)
    return base, wrapped


def graph_us(fn, reps: int = 20, rep_ms: int = 200) -> float:
    """Microseconds per call of `fn` replayed `reps` times inside one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    ms = do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    return ms * 1e3 / reps


def eager_us(fn) -> float:
    return do_bench(fn, warmup=10, rep=200, return_mode="median") * 1e3


@torch.inference_mode()
def table(num_slots: int, rank: int) -> list[str]:
    rows = ["| T | mode | " + " | ".join(f"{p} base / +LoRA µs" for p in PROJECTIONS)
            + " | layer overhead |", "|" + " --- |" * (3 + len(PROJECTIONS))]
    for num_tokens in TOKENS:
        batch = make_batch(num_tokens, num_slots, max(TOKENS))
        x = {n: torch.randn(num_tokens, PROJECTIONS[n][0], device=DEVICE, dtype=DTYPE)
             for n in PROJECTIONS}
        for mode in ("graph", "eager"):
            cells, base_sum, lora_sum = [], 0.0, 0.0
            for name in PROJECTIONS:
                base, wrapped = make_layer(name, batch, num_slots, rank)
                timer = graph_us if mode == "graph" else eager_us
                xin = x[name]
                t_base = timer(lambda base=base, xin=xin: base(xin))
                t_lora = timer(lambda wrapped=wrapped, xin=xin: wrapped(xin))
                cells.append(f"{t_base:.1f} / {t_lora:.1f}")
                base_sum += t_base
                lora_sum += t_lora
            rows.append(f"| {num_tokens} | {mode} | " + " | ".join(cells)
                        + f" | {100 * (lora_sum / base_sum - 1):+.1f}% |")
            print(rows[-1], flush=True)
    return rows


@torch.inference_mode()
def sweep(num_slots: int, rank: int) -> list[str]:
    """Pick SHRINK_CONFIG and EXPAND_CONFIG by summed graph time over the four projections."""
    shrink = list(itertools.product((16, 64), (64, 128, 256), (4, 8, 16), (4,)))
    expand = list(itertools.product((64, 128, 256), (16,), (1,), (4, 8)))
    lines = []
    for attr, space in (("SHRINK_CONFIG", shrink), ("EXPAND_CONFIG", expand),
                        ("TILE_M", [16, 32])):
        results: list[tuple[float, tuple]] = []
        for config in space:
            setattr(lora_kernels, attr, config)
            total = 0.0
            for num_tokens in (128, 2048):
                batch = make_batch(num_tokens, num_slots, num_tokens)
                for name in PROJECTIONS:
                    _, wrapped = make_layer(name, batch, num_slots, rank)
                    xin = torch.randn(num_tokens, PROJECTIONS[name][0], device=DEVICE,
                                      dtype=DTYPE)
                    try:
                        total += graph_us(lambda w=wrapped, xin=xin: w(xin), reps=5, rep_ms=40) * (
                            4 if num_tokens == 128 else 1)  # decode steps dominate
                    except Exception as e:  # noqa: BLE001 - a tile the compiler refuses
                        total = float("inf")
                        print(f"{attr} {config}: {type(e).__name__}", flush=True)
                        break
            results.append((total, config))
        total, config = min(results)
        setattr(lora_kernels, attr, config)
        lines.append(f"{attr} = {config}  (weighted graph time {total:.1f} µs)")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"shrink {lora_kernels.SHRINK_CONFIG}, expand {lora_kernels.EXPAND_CONFIG}"]
    print(lines[0])
    lines += table(args.num_slots, args.rank)
    if args.sweep:
        lines += sweep(args.num_slots, args.rank)
        lines += table(args.num_slots, args.rank)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
