"""NIXL disaggregated-prefill check and benchmark: a prefill instance P and a decode instance D
(both `NixlConnector`, on one GPU or the CPU), offline.

    python scripts/bench_nixl.py                       # qwen3-0.6b shape, dummy bf16 weights
    python scripts/bench_nixl.py --num-prompts 32 --prompt-len 4096
    python scripts/bench_nixl.py --model path/to/checkpoint

For a batch of random prompts it times (a) D computing the prompts itself (max_tokens=1: the
prefill a decode instance is spared), (b) P's prefill with do_remote_decode (blocks held),
(c) D's first token with the blocks read from P over NIXL (VRAM to VRAM on a GPU), and reports
the bytes read per second of (c). It then checks that greedy continuations on D after a read
equal P's plain answers (exact in fp32; bf16 may differ in a few near-tied tokens), that D
reported the read blocks as cached tokens, and that P's KV usage returned to zero after D's
notifications. Exits non-zero if the cached counts or the freeing fail.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import make_preset  # noqa: E402

from frontend import LLM, SamplingParams  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(llm: LLM, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (default: the qwen3-0.6b preset)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="per instance: two share the GPU")
    args = ap.parse_args()
    model = args.model or make_preset("qwen3-0.6b")
    engine = dict(load_format="auto" if args.model else "dummy", dtype=args.dtype,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  max_model_len=args.prompt_len + args.new_tokens + 16,
                  max_num_batched_tokens=8192, enable_prefix_caching=True)

    def kv() -> dict:
        return {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                "side_channel_port": free_port()}

    rng = random.Random(0)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    n = args.num_prompts
    prompts = [[rng.randrange(10, min(vocab, 30000)) for _ in range(args.prompt_len)]
               for _ in range(4 * n + 1)]
    # Warm-up batches of the timed size (Triton compiles and autotunes per shape; the on-disk
    # cache would otherwise favour whichever instance runs second) and one warm-up read (the
    # NIXL connection set-up).
    warm_d, warm_p, warm_read = prompts[:n], prompts[n:2 * n], prompts[2 * n:2 * n + 1]
    local, remote = prompts[2 * n + 1:3 * n + 1], prompts[3 * n + 1:]
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    p = LLM(model, **engine, kv_transfer_config=kv())
    d = LLM(model, **engine, kv_transfer_config=kv())
    try:
        held = msgspec.structs.replace(first, extra_args={
            "kv_transfer_params": {"do_remote_decode": True}})

        def reads(pre: list, **changes) -> list[SamplingParams]:
            """D's params reading each of P's held prompts (P's outputs `pre`)."""
            return [msgspec.structs.replace(greedy, **changes, extra_args={
                "kv_transfer_params": msgspec.to_builtins(o.kv_transfer_params)}) for o in pre]

        timed(d, warm_d, first)
        timed(p, warm_p, first)
        _, pre = timed(p, warm_read, held)
        timed(d, warm_read, reads(pre, max_tokens=1))
        t_local, _ = timed(d, local, first)
        t_prefill, pre = timed(p, remote, held)
        t_first, outs = timed(d, remote, reads(pre, max_tokens=1))
        cached = [o.num_cached_tokens for o in outs]
        stats = d.get_stats()
        block_size = 16  # CacheConfig's default
        block_bytes = _block_bytes(model, block_size, 4 if args.dtype == "float32" else 2)
        num_blocks = sum(c // block_size for c in cached)
        print(f"prompts {args.num_prompts} x {args.prompt_len} tokens")
        print(f"(a) D computes the prompts itself:      {t_local * 1e3:8.1f} ms")
        print(f"(b) P prefill, blocks held:             {t_prefill * 1e3:8.1f} ms")
        print(f"(c) D first token after NIXL reads:     {t_first * 1e3:8.1f} ms "
              f"({num_blocks} blocks, {num_blocks * block_bytes / t_first / 1e9:.2f} GB/s "
              "incl. scheduling and the last-token forward)")
        # Greedy continuations: a second round (P holds again; D reads again, fresh ids).
        plain = p.generate([{"prompt_token_ids": q} for q in remote], greedy, use_tqdm=False)
        _, pre = timed(p, remote, held)
        _, cont = timed(d, remote, reads(pre))
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids
                   for a, b in zip(cont, plain, strict=True))
        print(f"greedy continuations equal to P's plain answers: {same}/{len(remote)}")
        ok = all(c == (args.prompt_len - 1) // block_size * block_size for c in cached)
        print(f"D cached tokens as expected: {ok} (first: {cached[0]}); D prefix-cache hits "
              f"before the second round: {stats.prefix_cache_hits} tokens (expected 0)")
        deadline = time.monotonic() + 10
        while p.get_stats().kv_cache_usage > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        freed = p.get_stats().kv_cache_usage == 0
        print(f"P freed every held block after D's notifications: {freed}")
        return 0 if ok and freed else 1
    finally:
        d.shutdown()
        p.shutdown()


def _block_bytes(model: str, block_size: int, elem: int) -> int:
    """Bytes one KV block holds over all layers (K and V), from the checkpoint's config."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * block_size * heads * head_dim * elem


if __name__ == "__main__":
    sys.exit(main())
