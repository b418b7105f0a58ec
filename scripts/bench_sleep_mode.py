"""Sleep mode on a GPU: device memory released and retaken, time per call, identical outputs.

    PYTHONPATH=src python scripts/bench_sleep_mode.py [--model DIR | --preset qwen3-0.6b]

Free memory comes from `torch.cuda.mem_get_info` in this process: it is device-wide, so it sees
the worker process's allocations. Without --model the preset's random bf16 weights are used
(load_format dummy), so level 2 cannot be followed by a reload from disk; with --model it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import PRESETS, make_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (default: --preset, random weights)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    from frontend import LLM, SamplingParams

    model = args.model or make_preset(args.preset)
    llm = LLM(model, load_format="auto" if args.model else "dummy", enable_sleep_mode=True,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=4096)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = [[(7 * i + j) % 1000 + 5 for j in range(64)] for i in range(8)]

    def outputs() -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    def free_gib() -> float:
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0] / 2**30

    rows: list[dict] = []

    def step(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        rows.append({"step": name, "seconds": round(time.perf_counter() - start, 3),
                     "free_gib": round(free_gib(), 2)})
        print(f"{name:<24} {rows[-1]['seconds']:>7.3f} s   free {rows[-1]['free_gib']:>7.2f} GiB")

    try:
        before = outputs()
        step("awake", lambda: None)
        step("sleep(level=1)", lambda: llm.sleep(1))
        step("wake_up()", llm.wake_up)
        same_l1 = outputs() == before
        step("sleep(level=2)", lambda: llm.sleep(2))
        step("wake_up(['weights'])", lambda: llm.wake_up(["weights"]))
        if args.model:
            step("reload_weights()", llm.reload_weights)
        step("wake_up(['kv_cache'])", lambda: llm.wake_up(["kv_cache"]))
        same_l2 = outputs() == before if args.model else None
        released = rows[1]["free_gib"] - rows[0]["free_gib"]
        print(f"released by sleep(1): {released:.2f} GiB; outputs identical after level 1: "
              f"{same_l1}, after level 2 + reload: {same_l2}")
        result = {"model": args.model or args.preset, "device": torch.cuda.get_device_name(),
                  "steps": rows, "released_gib": round(released, 2),
                  "identical_after_level1": same_l1, "identical_after_level2": same_l2}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if not same_l1 or same_l2 is False:
            raise SystemExit("outputs changed after waking")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
