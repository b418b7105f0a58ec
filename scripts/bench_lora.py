"""Multi-LoRA throughput: N adapters mixed in every batch vs the base model alone (GPU).

    python scripts/bench_lora.py                       # llama-3.1-8b shape, 8 adapters, rank 16
    python scripts/bench_lora.py --num-adapters 8 --rank 16 --num-prompts 256 --out lora.json

The model is a preset of bench_throughput.py (config.json of the real shape, random bf16 weights,
nothing downloaded); the adapters are random PEFT directories (adapter_config.json +
adapter_model.safetensors) on q/k/v/o/gate/up/down of every layer. The workload is
bench_throughput's (N requests, prompt and output lengths uniform in [min_len, max_len],
ignore_eos). Three runs, one engine each, in this order:

    base       engine without LoRA, no adapters                 (the reference)
    lora-base  --enable-lora, every request on the base model   (cost of the LoRA hooks alone)
    lora-mix   --enable-lora, request i uses adapter i % N       (every batch mixes N adapters)

The goal (issue #7) is lora-mix output throughput within 15% of base.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_throughput import PRESETS, make_preset, workload

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapters(model_dir: str, count: int, rank: int, seed: int) -> list[str]:
    """`count` random PEFT adapters for the checkpoint's shapes, in a temporary folder."""
    import torch
    from safetensors.torch import save_file

    from enginecore.lora_adapter import lora_module_shapes

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = lora_module_shapes(cfg)
    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        out = root / f"adapter{i}"
        out.mkdir()
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for name in TARGETS:
                fan_in, fan_out = shapes[name]
                part = "self_attn" if name in TARGETS[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{name}"
                tensors[f"{key}.lora_A.weight"] = (
                    torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (
                    torch.randn(fan_out, rank, generator=gen) * 0.01).to(torch.bfloat16)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
            list(TARGETS), "bias": "none", "lora_dropout": 0.0}))
        paths.append(str(out))
    return paths


def run(llm, reqs, loras) -> dict:
    from frontend import SamplingParams

    params = [SamplingParams(temperature=0.6, max_tokens=out, ignore_eos=True, detokenize=False)
              for _, out in reqs]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    # Warm-up, short, with every adapter: loads each into the CPU cache and a GPU slot once.
    warm = SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)
    num_warm = min(len(prompts), 16)
    llm.generate(prompts[:num_warm], warm, use_tqdm=False, lora_request=loras[:num_warm])
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in reqs)
    return {"elapsed_s": elapsed, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / elapsed,
            "total_tok_s": (out_tokens + in_tokens) / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    ap.add_argument("--model", help="a folder with a Llama-family config.json (random weights "
                                    "too); default: --preset")
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--runs", nargs="+", default=["base", "lora-base", "lora-mix"],
                    choices=["base", "lora-base", "lora-mix"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from frontend import LLM, LoRARequest

    model = args.model or make_preset(args.preset)
    adapters = make_adapters(model, args.num_adapters, args.rank, args.seed)
    mixed = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(adapters)]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    reqs = [([t % vocab for t in p], out)
            for p, out in workload(args.num_prompts, args.min_len, args.max_len, args.seed)]
    engine_args = dict(load_format="dummy", max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len)
    lora_args = dict(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    results: dict = {"model": args.model or args.preset, "num_adapters": args.num_adapters,
                     "rank": args.rank, "requests": len(reqs)}
    for name in args.runs:
        loras = [mixed[i % len(mixed)] for i in range(len(reqs))] if name == "lora-mix" \
            else [None] * len(reqs)
        llm = LLM(model, **engine_args, **({} if name == "base" else lora_args))
        try:
            results[name] = run(llm, reqs, loras)
        finally:
            llm.shutdown()
        print(name, json.dumps(results[name]), flush=True)
    if "base" in results:
        for name in ("lora-base", "lora-mix"):
            if name in results:
                results[f"{name}_vs_base"] = (results[name]["output_tok_s"]
                                              / results["base"]["output_tok_s"])
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
