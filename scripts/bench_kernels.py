"""Benchmark the Triton paged-attention kernels on a CUDA GPU against measured ceilings and SDPA.

    PYTHONPATH=src python scripts/bench_kernels.py [--sweep] [--out results.md]

Decode (split-KV, CUDA-graph replays) is reported in TB/s of K/V + q + out bytes against a
measured device-to-device copy; prefill in TFLOP/s of unmasked causal work against a measured
bf16 matmul. torch SDPA runs on dense, contiguous K/V (no paging) as the reference point.
Workload: Llama-8B attention (Hq 32, Hkv 8, D 128), bf16, block_size 16, shuffled blocks.
`--sweep` first times candidate tiles and runs the tables with the fastest (module tables
patched in place); copy the chosen ones into kernels/attention.py.

Dimension legend: B sequences, T tokens, Hq/Hkv heads, D head dim, S context, P block size.
"""

from __future__ import annotations

import argparse
import math
import random

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import attention
from kernels.attention import AttnTile, paged_attention

DEVICE = "cuda"
HQ, HKV, D, P = 32, 8, 128, 16
DTYPE = torch.bfloat16
L2_FLUSH_BYTES = 256 << 20  # rotate inputs until this many bytes so L2 (50 MB) cannot serve them


def ceilings() -> tuple[float, float]:
    """Measured (copy TB/s counting read + write, bf16 matmul TFLOP/s) on this device."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, dtype=DTYPE, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=DTYPE, device=DEVICE)
    c = torch.empty_like(a)
    t_mm = do_bench(lambda: torch.matmul(a, b, out=c), warmup=50, rep=500, return_mode="median")
    return 2 * src.numel() / t_copy / 1e9, 2 * 8192**3 / t_mm / 1e9


def paged_inputs(seqs: list[tuple[int, int]], seed: int) -> dict:
    """Random query and paged cache for (q_len, seq_len) per sequence; blocks shuffled."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    nblk = [-(-s // P) for _, s in seqs]
    ids = list(range(sum(nblk)))
    random.Random(seed).shuffle(ids)
    tables = torch.zeros(len(seqs), max(nblk), dtype=torch.int32)
    for b, n in enumerate(nblk):
        tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)])
    cache = torch.randn(2, sum(nblk), P, HKV, D, generator=gen, device=DEVICE, dtype=DTYPE)
    num_tokens = sum(q for q, _ in seqs)
    qsl = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(torch.int32)
    return dict(query=torch.randn(num_tokens, HQ, D, generator=gen, device=DEVICE, dtype=DTYPE),
                kv_cache=cache, query_start_loc=qsl.to(DEVICE),
                seq_lens=torch.tensor([s for _, s in seqs], dtype=torch.int32, device=DEVICE),
                block_tables=tables.to(DEVICE), scale=D**-0.5,
                max_query_len=max(q for q, _ in seqs))


def dense_kv(inp: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's context gathered from the cache -> k, v [1, Hkv, S, D]."""
    seq_len = int(inp["seq_lens"][b])
    blocks = inp["block_tables"][b, :-(-seq_len // P)].long()
    k, v = (inp["kv_cache"][i, blocks].flatten(0, 1)[:seq_len] for i in (0, 1))
    return k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()


def graph_time(fns: list) -> float:
    """Median ms of one call: all fns (one per rotated input set) captured back to back."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / len(fns)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_decode(bs: int, ctx: int, with_sdpa: bool = True) -> dict:
    """One decode step of bs sequences at context ctx: Triton vs SDPA on dense KV."""
    kv_bytes = 2 * bs * ctx * HKV * D * DTYPE.itemsize
    io_bytes = kv_bytes + 2 * bs * HQ * D * DTYPE.itemsize
    copies = max(1, min(32, math.ceil(L2_FLUSH_BYTES / kv_bytes)))
    inputs = [paged_inputs([(1, ctx)] * bs, seed=i) for i in range(copies)]
    outs = [torch.empty_like(inp["query"]) for inp in inputs]
    t_tri = graph_time([lambda i=i: paged_attention(**inputs[i], out=outs[i])
                        for i in range(copies)])
    # SDPA on the same data, dense [B, Hkv, S, D] (what a non-paged engine would read).
    dense = []
    for inp in inputs:
        ks, vs = zip(*(dense_kv(inp, b) for b in range(bs)), strict=True)
        dense.append((inp["query"].view(bs, HQ, 1, D), torch.cat(ks), torch.cat(vs)))
    sdpa = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            for q, k, v in dense]
    t_sdpa, err = float("nan"), float("nan")
    if with_sdpa:
        t_sdpa = graph_time(sdpa)
        err = rel_err(outs[0], sdpa[0]().view(bs, HQ, D))
    return dict(t_tri=t_tri, t_sdpa=t_sdpa, tbs=io_bytes / t_tri / 1e9,
                tbs_sdpa=io_bytes / t_sdpa / 1e9, err=err)


def causal_flops(seqs: list[tuple[int, int]]) -> float:
    """Unmasked causal work: 4 * Hq * D per visible (query, key) pair."""
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for q, s in seqs)
    return 4 * HQ * D * pairs


def bench_prefill(seqs: list[tuple[int, int]], with_sdpa: bool = True) -> dict:
    """One prefill step; SDPA (causal, dense) only when every sequence is a pure prefill."""
    inp = paged_inputs(seqs, seed=7)
    out = torch.empty_like(inp["query"])
    t_tri = do_bench(lambda: paged_attention(**inp, out=out), warmup=25, rep=200,
                     return_mode="median")
    flops = causal_flops(seqs)
    res = dict(t_tri=t_tri, tflops=flops / t_tri / 1e9, t_sdpa=float("nan"),
               tflops_sdpa=float("nan"), err=float("nan"))
    q_lens = {q for q, _ in seqs}
    if with_sdpa and all(q == s for q, s in seqs) and len(q_lens) == 1:
        n = len(seqs)
        ks, vs = zip(*(dense_kv(inp, b) for b in range(n)), strict=True)
        q = inp["query"].view(n, -1, HQ, D).transpose(1, 2)
        k, v = torch.cat(ks), torch.cat(vs)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        t_sdpa = do_bench(fn, warmup=25, rep=200, return_mode="median")
        ref = fn().transpose(1, 2).reshape(-1, HQ, D)
        res.update(t_sdpa=t_sdpa, tflops_sdpa=flops / t_sdpa / 1e9, err=rel_err(out, ref))
    return res


DECODE_CASES = [(bs, ctx) for bs in (1, 8, 64) for ctx in (1024, 4096, 8192)]
PREFILL_CASES = {
    "1 x 1k": [(1024, 1024)],
    "1 x 4k": [(4096, 4096)],
    "1 x 8k": [(8192, 8192)],
    "8 x 1k": [(1024, 1024)] * 8,
    "2k chunk on 6k prefix": [(2048, 8192)],
    "mixed: 1k prefill + 63 decodes @2k": [(1024, 1024)] + [(1, 2048)] * 63,
}
PREFILL_SWEEP = [AttnTile(64, 64, 4, 3), AttnTile(128, 128, 8, 3), AttnTile(128, 64, 8, 3),
                 AttnTile(64, 32, 4, 4)]
DECODE_SWEEP = [(AttnTile(16, 64, 2, 4), 4), (AttnTile(16, 64, 2, 4), 2)]
SWEEP_PREFILL_CASES = ("1 x 1k", "1 x 4k", "8 x 1k", "mixed: 1k prefill + 63 decodes @2k")
SWEEP_DECODE_CASES = ((1, 1024), (1, 8192), (8, 4096), (64, 8192))


class Report:
    """Lines printed as they come and appended to an optional file (a killed run keeps them)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            open(path, "w").close()

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def row(self, label: str, fn) -> None:
        """Emit fn()'s line, or the error it raised (the other rows still run)."""
        try:
            self(fn())
        except Exception as exc:  # noqa: BLE001 - a failed row must not lose the others
            self(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:200]} |")


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def sweep(emit: Report) -> None:
    """Time candidate tiles and leave the fastest (geometric mean) in the module tables."""
    key = (D, DTYPE)
    scores: dict[AttnTile, float] = {}
    for tile in PREFILL_SWEEP:
        attention.PREFILL_TILES[key] = tile
        try:
            tflops = [bench_prefill(PREFILL_CASES[c], False)["tflops"]
                      for c in SWEEP_PREFILL_CASES]
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip the tile
            emit(f"sweep prefill {tuple(tile)} failed: {type(exc).__name__}: {str(exc)[:150]}")
            continue
        scores[tile] = geomean(tflops)
        emit(f"sweep prefill {tuple(tile)} TFLOP/s {'/'.join(SWEEP_PREFILL_CASES)}: "
             + " ".join(f"{x:.0f}" for x in tflops))
    attention.PREFILL_TILES[key] = max(scores, key=scores.__getitem__)
    emit(f"chosen prefill tile {tuple(attention.PREFILL_TILES[key])}")
    times: dict[tuple[AttnTile, int], float] = {}
    for tile, per_sm in DECODE_SWEEP:
        attention.DECODE_TILES[key], attention.DECODE_PROGRAMS_PER_SM = tile, per_sm
        try:
            us = [bench_decode(bs, ctx, False)["t_tri"] * 1e3 for bs, ctx in SWEEP_DECODE_CASES]
        except Exception as exc:  # noqa: BLE001
            emit(f"sweep decode {tuple(tile)} failed: {type(exc).__name__}: {str(exc)[:150]}")
            continue
        times[tile, per_sm] = geomean(us)
        emit(f"sweep decode {tuple(tile)} per_sm={per_sm} us 1x1k/1x8k/8x4k/64x8k: "
             + " ".join(f"{x:.1f}" for x in us))
    best = min(times, key=times.__getitem__)
    attention.DECODE_TILES[key], attention.DECODE_PROGRAMS_PER_SM = best
    emit(f"chosen decode tile {tuple(best[0])} per_sm={best[1]}\n")


def decode_row(bs: int, ctx: int, copy_tbs: float) -> str:
    r = bench_decode(bs, ctx)
    return (f"| {bs} x {ctx} | {r['t_tri'] * 1e3:.1f} | {r['tbs']:.2f} | "
            f"{100 * r['tbs'] / copy_tbs:.0f}% | {r['t_sdpa'] * 1e3:.1f} | "
            f"{r['tbs_sdpa']:.2f} | {r['err']:.1e} |")


def prefill_row(name: str, seqs: list[tuple[int, int]], mm_tflops: float) -> str:
    r = bench_prefill(seqs)
    return (f"| {name} | {r['t_tri']:.3f} | {r['tflops']:.0f} | "
            f"{100 * r['tflops'] / mm_tflops:.0f}% | {r['t_sdpa']:.3f} | "
            f"{r['tflops_sdpa']:.0f} | {r['err']:.1e} |")


def kernel_report(emit: Report) -> None:
    """Registers, spills, shared memory and MMA flavour of every compiled attention kernel."""
    for fn in (attention._prefill_kernel, attention._decode_kernel,
               attention._decode_reduce_kernel, attention._store_kv_kernel):
        for caches in fn.device_caches.values():
            for kernel in caches[0].values():
                meta = kernel.metadata
                ptx = kernel.asm.get("ptx", "")
                mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "-"
                emit(f"kernel {kernel.name}: warps {meta.num_warps} stages {meta.num_stages} "
                     f"regs {kernel.n_regs} spills {kernel.n_spills} smem {meta.shared} {mma}")


def main() -> None:
    """Print (and optionally write) the ceilings, decode and prefill tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="time candidate tiles first, keep the best")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args()
    emit = Report(args.out)
    if args.sweep:
        sweep(emit)
    copy_tbs, mm_tflops = ceilings()
    props = torch.cuda.get_device_properties(0)
    emit(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
         f"triton {triton.__version__}")
    emit(f"ceilings: copy {copy_tbs:.2f} TB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s\n")
    emit("| decode B x S | Triton us | TB/s | % copy | SDPA dense us | SDPA TB/s | rel err |\n"
         "| --- | --- | --- | --- | --- | --- | --- |")
    for bs, ctx in DECODE_CASES:
        emit.row(f"{bs} x {ctx}", lambda bs=bs, ctx=ctx: decode_row(bs, ctx, copy_tbs))
    emit("\n| prefill | Triton ms | TFLOP/s | % matmul | SDPA ms | SDPA TFLOP/s | rel err |\n"
         "| --- | --- | --- | --- | --- | --- | --- |")
    for name, seqs in PREFILL_CASES.items():
        emit.row(name, lambda name=name, seqs=seqs: prefill_row(name, seqs, mm_tflops))
    emit.row("kernels", lambda: kernel_report(emit) or "")


if __name__ == "__main__":
    main()
