"""Batch invariance on a GPU at a real model shape: one prompt alone and inside batches of many
sizes must give bitwise-identical tokens and logprobs with --batch-invariant; the same run
without it shows whether the default kernels differ; decode throughput of both.

    PYTHONPATH=src python scripts/check_batch_invariance.py [--model DIR | --preset qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import PRESETS, make_preset  # noqa: E402


def fingerprint(out) -> tuple:
    comp = out.outputs[0]
    return comp.token_ids, [sorted((t, lp.logprob) for t, lp in pos.items())
                            for pos in comp.logprobs]


def run(model: str, load_format: str, invariant: bool, sizes: list[int]) -> dict:
    from frontend import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    rng = random.Random(0)
    target = [rng.randrange(5, 30000) for _ in range(700)]
    llm = LLM(model, load_format=load_format, batch_invariant=invariant, max_model_len=4096,
              max_num_batched_tokens=2048, max_num_seqs=max(sizes))
    try:
        alone = fingerprint(llm.generate([target], params, use_tqdm=False)[0])
        mismatches = []
        for size in sizes:
            others = [[rng.randrange(5, 30000) for _ in range(rng.randint(10, 1500))]
                      for _ in range(size - 1)]
            where = rng.randrange(size)
            outs = llm.generate(others[:where] + [target] + others[where:], params,
                                use_tqdm=False)
            if fingerprint(outs[where]) != alone:
                mismatches.append(size)
        batch = [[rng.randrange(5, 30000) for _ in range(128)] for _ in range(max(sizes))]
        decode = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, decode, use_tqdm=False)
        tok_s = len(batch) * 256 / (time.perf_counter() - start)
    finally:
        llm.shutdown()
    return {"batch_invariant": invariant, "mismatched_batch_sizes": mismatches,
            "tokens_per_s": round(tok_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 7, 16, 33, 64])
    ap.add_argument("--out")
    args = ap.parse_args()
    model = args.model or make_preset(args.preset)
    fmt = "auto" if args.model else "dummy"
    results = [run(model, fmt, inv, args.sizes) for inv in (True, False)]
    for r in results:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if results[0]["mismatched_batch_sizes"]:
        raise SystemExit("batch_invariant=True still depends on the batch")


if __name__ == "__main__":
    main()
