"""Offline throughput and decode-latency benchmark.

Throughput mode (default) runs the nano-vllm workload: N requests with prompt and output
lengths uniform in [min_len, max_len], random token ids, temperature 0.6, ignore_eos. Latency
mode measures decode speed at a fixed batch size and context (the time between consecutive
tokens of each stream).

    python scripts/bench_throughput.py --preset qwen3-0.6b
    python scripts/bench_throughput.py --preset llama-3.1-8b --mode latency --batch-sizes 1 64
    python scripts/bench_throughput.py --model path/to/checkpoint --hf-baseline 16
    python scripts/bench_throughput.py --preset llama-3.1-8b --tensor-parallel-size 2
    python scripts/bench_throughput.py --preset qwen3-0.6b --data-parallel-size 2  # 2 GPUs

Presets write a config.json of the real model's shape and use random bf16 weights
(load_format "dummy"), so nothing is downloaded. `--hf-baseline K` also runs transformers'
`generate` on the same shapes (random weights too) for K of the requests, batched, for a side by
side number in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_theta": 1000000.0, "hidden_act": "silu", "eos_token_id": 2, "bos_token_id": 1,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "hidden_act": "silu", "eos_token_id": 2, "bos_token_id": 1,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
}


def make_preset(name: str, **overrides) -> str:
    """A checkpoint folder with the preset's config.json (plus `overrides`) and the demo
    tokenizer (no weights)."""
    from workers.demo import build_tokenizer

    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    build_tokenizer(out)
    config = {**PRESETS[name], "dtype": "bfloat16", **overrides}
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def workload(n: int, lo: int, hi: int, seed: int) -> list[tuple[list[int], int]]:
    """nano-vllm's bench.py draws, in its order: each prompt's length then its ids (< 10,000),
    then every max_tokens. Seed 0, n=256, [100, 1024] gives 142,827 prompt / 133,966 output
    tokens."""
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(lo, hi))]
               for _ in range(n)]
    return list(zip(prompts, [random.randint(lo, hi) for _ in range(n)], strict=True))


def run_throughput(llm, reqs, structured_fraction: float = 0.0) -> dict:
    from frontend import SamplingParams
    from sampling.params import StructuredOutputsParams

    # Constrained requests (the fraction asked, spread evenly) carry a regex that never completes,
    # so ignore_eos keeps every output length exact.
    regex = StructuredOutputsParams(regex="[a-z ,.]*")
    params = [SamplingParams(temperature=0.6, max_tokens=out, ignore_eos=True, detokenize=False,
                             structured_outputs=regex if int((i + 1) * structured_fraction)
                             > int(i * structured_fraction) else None)
              for i, (_, out) in enumerate(reqs)]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in reqs)
    return {"requests": len(reqs), "elapsed_s": elapsed, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / elapsed, "total_tok_s": (out_tokens + in_tokens) / elapsed}


def run_latency(llm, batch_size: int, context: int, new_tokens: int, vocab: int) -> dict:
    """Per-stream inter-token latency at a fixed batch size after a `context`-token prompt."""
    from frontend import OutputKind, SamplingParams

    engine = llm.engine
    rng = random.Random(batch_size)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)

    async def stream(i: int) -> list[float]:
        prompt = {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(context)]}
        stamps = []
        async for _ in engine.generate(prompt, params, f"lat-{batch_size}-{i}",
                                       output_kind=OutputKind.DELTA):
            stamps.append(time.perf_counter())
        return stamps

    async def all_streams():
        return await asyncio.gather(*(stream(i) for i in range(batch_size)))

    llm._run(all_streams())  # warm-up (also fills the prefix cache for nothing: fresh prompts)
    stamps = llm._run(all_streams())
    # Skip the first gaps: they overlap with other streams' prefills.
    gaps = [b - a for s in stamps for a, b in zip(s[8:], s[9:], strict=False)]
    itl = statistics.median(gaps)
    return {"batch_size": batch_size, "context": context, "median_itl_ms": itl * 1e3,
            "tok_s_per_stream": 1 / itl, "tok_s_total": batch_size / itl}


def run_hf_baseline(model_dir: str, reqs, count: int) -> dict:
    """transformers generate on the same shapes (random bf16 weights), one padded batch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    sub = reqs[:count]
    new = max(out for _, out in sub)
    width = max(len(p) for p, _ in sub)
    ids = torch.zeros((len(sub), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(sub):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(sub)
    del model
    torch.cuda.empty_cache()
    return {"requests": len(sub), "max_new_tokens": new, "elapsed_s": elapsed,
            "output_tok_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (default: --preset)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b")
    ap.add_argument("--mode", choices=["throughput", "latency"], default="throughput")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-baseline", type=int, default=0, metavar="K")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--enable-expert-parallel", action="store_true")
    ap.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                    help="engine cores (model replicas), each on its own GPU(s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--structured-fraction", type=float, default=0.0,
                    help="throughput mode: fraction of requests with a regex constraint")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from frontend import LLM

    model = args.model or make_preset(args.preset)
    load_format = "auto" if args.model else "dummy"
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    results: dict = {"model": args.model or args.preset, "mode": args.mode,
                     "tensor_parallel_size": args.tensor_parallel_size,
                     "enable_expert_parallel": args.enable_expert_parallel,
                     "data_parallel_size": args.data_parallel_size}
    llm = LLM(model, load_format=load_format, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              tensor_parallel_size=args.tensor_parallel_size,
              enable_expert_parallel=args.enable_expert_parallel,
              data_parallel_size=args.data_parallel_size)
    try:
        if args.mode == "throughput":
            reqs = workload(args.num_prompts, args.min_len, args.max_len, args.seed)
            results["engine"] = run_throughput(llm, reqs, args.structured_fraction)
        else:
            results["engine"] = [run_latency(llm, bs, args.context, args.new_tokens, vocab)
                                 for bs in args.batch_sizes]
    finally:
        llm.shutdown()
    if args.hf_baseline:
        reqs = workload(args.num_prompts, args.min_len, args.max_len, args.seed)
        results["transformers"] = run_hf_baseline(model, reqs, args.hf_baseline)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
