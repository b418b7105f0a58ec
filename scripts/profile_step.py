"""Where a decode step's time goes inside one worker (no engine processes, no IPC).

Drives a `ModelRunner` directly with dummy weights: one prefill of B requests at a given context,
then decode steps. Reports per step: the whole `execute()`, input staging alone, the graph replay
alone (CUDA events), and the sampler; then a torch.profiler kernel table for one step.

    python scripts/profile_step.py --preset llama-3.1-8b --batch-size 1 --context 1024
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import msgspec
import numpy as np
import torch
from bench_throughput import make_preset

from enginecore.config import EngineConfig
from enginecore.protocol import CachedReqs, ExecuteStep, NewReq, StepResult
from sampling.params import SamplingParams, StructuredOutputsParams
from sampling.structured import fill_bitmasks
from workers.runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--structured-fraction", type=float, default=0.0,
                    help="fraction of the requests constrained by the regex [a-z ,.]*")
    ap.add_argument("--cprofile", action="store_true",
                    help="also print the host functions the sampling piece spends time in")
    ap.add_argument("--switch-interval", type=float,
                    help="sys.setswitchinterval (seconds) for the run")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    bs, ctx = args.batch_size, args.context
    cfg = EngineConfig.create(make_preset(args.preset), load_format="dummy", max_model_len=4096,
                              max_num_seqs=max(bs, 1), max_num_batched_tokens=max(8192, bs))
    runner = ModelRunner(cfg, torch.device("cuda"), torch.bfloat16)
    block = cfg.cache.block_size
    per_req = (ctx + 3 * args.steps + 8 + block) // block  # room for every step below
    runner.init_kv_cache(bs * per_req + 1)
    free = SamplingParams(temperature=args.temperature, max_tokens=4096, ignore_eos=True)
    constrained = msgspec.structs.replace(
        free, structured_outputs=StructuredOutputsParams(regex="[a-z ,.]*"))
    frac = args.structured_fraction
    params = [constrained if int((i + 1) * frac) > int(i * frac) else free for i in range(bs)]
    ids = [f"r{i}" for i in range(bs)]
    new = [NewReq(rid, [7] * ctx, params[i], list(range(1 + i * per_req, 1 + (i + 1) * per_req)),
                  0) for i, rid in enumerate(ids)]
    step_id = 0
    # Prefill in chunks of the token budget.
    for rid_chunk in range(0, bs, max(1, 8192 // ctx)):
        chunk = new[rid_chunk: rid_chunk + max(1, 8192 // ctx)]
        step_id += 1
        runner.execute(ExecuteStep(step_id, chunk, CachedReqs(), {r.req_id: ctx for r in chunk}))
    computed = {rid: ctx for rid in ids}

    def decode_step() -> ExecuteStep:
        nonlocal step_id
        step_id += 1
        cached = CachedReqs(req_ids=list(ids), new_block_ids=[[] for _ in ids],
                            num_computed_tokens=[computed[r] for r in ids])
        for r in ids:
            computed[r] += 1
        return ExecuteStep(step_id, [], cached, {r: 1 for r in ids})

    totals, prep, replay, sample, flush, fill = [], [], [], [], [], []
    host_profile = cProfile.Profile()
    for _ in range(args.steps):
        step = decode_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.execute(step)
        totals.append(time.perf_counter() - t0)
    # Pieces, measured separately on one more step's inputs.
    for _ in range(args.steps):
        step = decode_step()
        runner._update_states(step)
        t0 = time.perf_counter()
        inputs = runner._prepare_inputs(step)
        prep.append(time.perf_counter() - t0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        hidden = runner._forward(inputs)
        end.record()
        torch.cuda.synchronize()
        replay.append(start.elapsed_time(end) / 1e3)
        grammars = [r.grammar for r in inputs.sample_reqs if r.grammar is not None]
        if grammars:  # the grammar work alone, on this thread: advance matchers, fill masks
            t0 = time.perf_counter()
            for g in grammars:
                g.is_active  # noqa: B018 - consumes the deferred tokens
            flush.append(time.perf_counter() - t0)
            scratch = np.zeros((len(grammars), -(-runner.sampler.vocab_size // 32)), np.int32)
            t0 = time.perf_counter()
            fill_bitmasks(grammars, scratch)
            fill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if args.cprofile:
            host_profile.enable()
        runner._sample(hidden, inputs, StepResult(step_id=0, req_ids=[], sampled=[]))
        if args.cprofile:
            host_profile.disable()
        sample.append(time.perf_counter() - t0)

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e3:.3f} ms"

    print(f"{args.preset} bs={bs} ctx={ctx} constrained={frac}: execute {ms(totals)} | "
          f"prepare {ms(prep)} | "
          f"forward (GPU) {ms(replay)} | logits+sample (host, incl. sync) {ms(sample)}")
    if fill:
        print(f"grammar work alone ({len(grammars)} rows, main thread): advance matchers "
              f"{ms(flush)} | fill bitmask {ms(fill)}")
    if args.cprofile:
        pstats.Stats(host_profile).sort_stats("tottime").print_stats(20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.execute(decode_step())
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
