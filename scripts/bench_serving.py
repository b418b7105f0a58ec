"""Online serving benchmark: load a running server and report latency and throughput.

    python -m frontend serve MODEL &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 8 --input-len 256 --output-len 128 --result-file result.json

Requests go to /v1/completions with `stream=true`, so the first chunk times the first token and
the gaps between chunks are the inter-token latencies. Arrivals follow a Poisson process at
`--request-rate` requests/s (`inf`: all at once), optionally capped at `--max-concurrency` in
flight. Prompts are token ids sampled from the tokenizer's ids of a fixed text (so any model
works); their lengths are `--input-len` exactly, or uniform in input_len * [1 - r, 1 + r] with
`--range-ratio r`; likewise the outputs, made exact with `ignore_eos`.

Reported (ms): TTFT (arrival -> first token), TPOT ((latency - TTFT) / (tokens - 1) per request),
ITL (every gap between chunks), E2E latency; mean, p50, p99 of each; request and output-token
throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

_SEED_TEXT = (
    "the of and to in is it that was for on are with as his they be at one have this from or "
    "had by hot word but what some we can out other were all there when up use your how said "
    "model token server cache block request stream queue kernel memory batch engine prompt "
    "answer question hello thanks please water number sound people first time little world"
)


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between chunks
    error: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s, Poisson arrivals (inf: send all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="0: fixed lengths; r: uniform in len * [1 - r, 1 + r]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structured-fraction", type=float, default=0.0,
                   help="fraction of requests carrying a structured-output constraint "
                        f"({_STRUCTURED})")
    p.add_argument("--result-file", default=None, help="write the summary as JSON here")
    return p.parse_args(argv)


async def _prepare(session: aiohttp.ClientSession, args: argparse.Namespace,
                   ) -> tuple[str, list[tuple[list[int], int]]]:
    """(model name, [(prompt token ids, output length)]) for every request."""
    async with session.get(args.base_url + "/v1/models") as resp:
        resp.raise_for_status()
        model = args.model or (await resp.json())["data"][0]["id"]
    async with session.post(args.base_url + "/tokenize",
                            json={"model": model, "prompt": _SEED_TEXT,
                                  "add_special_tokens": False}) as resp:
        resp.raise_for_status()
        pool = sorted(set((await resp.json())["tokens"]))
    rng = random.Random(args.seed)

    def length(n: int) -> int:
        lo, hi = int(n * (1 - args.range_ratio)), int(n * (1 + args.range_ratio))
        return max(1, rng.randint(lo, hi))

    reqs = [([rng.choice(pool) for _ in range(length(args.input_len))], length(args.output_len))
            for _ in range(args.num_prompts)]
    return model, reqs


# A constraint that never completes, so ignore_eos keeps output lengths exact under it.
_STRUCTURED = {"regex": "[a-z ,.]*"}


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
               output_len: int, structured: bool = False) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if structured:
        body["structured_outputs"] = _STRUCTURED
    result = RequestResult(prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_len > 0
    except aiohttp.ClientError as e:
        result.error = repr(e)
    return result


async def run(args: argparse.Namespace) -> dict:
    """Send the load; return the summary."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=connector) as session:
        model, reqs = await _prepare(session, args)
        url = args.base_url + "/v1/completions"
        limit = asyncio.Semaphore(args.max_concurrency or len(reqs) or 1)
        rng = random.Random(args.seed + 1)

        async def limited(prompt: list[int], output_len: int, structured: bool) -> RequestResult:
            async with limit:
                return await _one(session, url, model, prompt, output_len, structured)

        tasks = []
        start = time.perf_counter()
        for i, (prompt, output_len) in enumerate(reqs):
            # Every k-th request constrained, spread evenly through the run.
            structured = args.structured_fraction > 0 and (
                int((i + 1) * args.structured_fraction) > int(i * args.structured_fraction))
            tasks.append(asyncio.create_task(limited(prompt, output_len, structured)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def _pct(values: list[float], q: float) -> float:
    """q-th percentile (0-100) with linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult],
              duration: float) -> dict:
    """Throughputs and mean/p50/p99 latencies (ms) of the successful requests."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary: dict = {
        "model": model, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "duration_s": duration,
        "structured_fraction": args.structured_fraction,
        # JSON has no Infinity: "all at once" is null.
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "total_input_tokens": sum(r.prompt_len for r in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name, values in series.items():
        summary[f"mean_{name}_ms"] = statistics.fmean(values) * 1e3 if values else 0.0
        summary[f"p50_{name}_ms"] = _pct(values, 50) * 1e3
        summary[f"p99_{name}_ms"] = _pct(values, 99) * 1e3
    return summary


def report(summary: dict) -> str:
    """The summary as aligned text lines."""
    lines = [f"{'completed / failed':<34}{summary['completed']} / {summary['failed']}",
             f"{'duration (s)':<34}{summary['duration_s']:.2f}",
             f"{'request throughput (req/s)':<34}{summary['request_throughput']:.2f}",
             f"{'output token throughput (tok/s)':<34}{summary['output_throughput']:.1f}"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        lines.append(f"{name.upper() + ' ms (mean / p50 / p99)':<34}"
                     f"{summary[f'mean_{name}_ms']:.2f} / {summary[f'p50_{name}_ms']:.2f} / "
                     f"{summary[f'p99_{name}_ms']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    print(report(summary))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

