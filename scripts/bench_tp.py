"""Tensor-parallel scaling: the same offline benchmark at TP=1 and TP=2 (or any sizes), one table.

Runs `scripts/bench_throughput.py` once per tensor-parallel size (a fresh process each, so GPU
memory is clean) in throughput and decode-latency modes and prints one line per run.

    python scripts/bench_tp.py --preset llama-3.1-8b                 # TP 1 vs 2, both modes
    python scripts/bench_tp.py --preset qwen3-0.6b --sizes 1 2 --modes latency

Extra arguments after `--` go to every bench_throughput.py run unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(size: int, mode: str, preset: str, extra: list[str]) -> dict:
    """One bench_throughput.py run; its JSON result."""
    out = Path(tempfile.mkdtemp()) / "result.json"
    cmd = [sys.executable, str(HERE / "bench_throughput.py"), "--preset", preset, "--mode", mode,
           "--tensor-parallel-size", str(size), "--out", str(out), *extra]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["throughput", "latency"],
                    choices=["throughput", "latency"])
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="-- then bench_throughput.py args")
    args = ap.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    lines = []
    for mode in args.modes:
        for size in args.sizes:
            full = run(size, mode, args.preset, extra)
            name, result = Path(full["model"]).name, full["engine"]
            if mode == "throughput":
                lines.append(f"{name} tp={size} throughput: "
                             f"{result['output_tok_s']:.0f} output tok/s, "
                             f"{result['total_tok_s']:.0f} total tok/s, "
                             f"{result['elapsed_s']:.1f} s")
            else:
                lines += [f"{name} tp={size} decode bs={r['batch_size']} "
                          f"ctx={r['context']}: ITL {r['median_itl_ms']:.2f} ms, "
                          f"{r['tok_s_total']:.0f} tok/s" for r in result]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
