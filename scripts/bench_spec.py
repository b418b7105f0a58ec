"""Speculative decoding benchmark: decode speed with controlled draft acceptance.

For each batch size, `bs` greedy requests (random prompt of --prompt-len tokens, --new-tokens
outputs, ignore_eos) run to completion under each configuration:

    none        no speculation, async scheduling on (the engine's default)
    none-sync   no speculation, async scheduling off (what speculation runs with)
    self        draft_model = the target itself: every draft accepted (acceptance ~100%),
                but each draft costs a full target forward: the upper bound of what verification
                buys per step, and its price
    unrelated   draft_model = a 2-layer model of the target's shape and vocab: drafts almost
                never accepted (~0%): the pure overhead of drafting + verifying
    ngram       prompt lookup; random-weight models fall into short output cycles, which the
                lookup then predicts (acceptance is measured and printed, not assumed)
    pair        (with --pair-layers m) a cheap draft with controlled acceptance: the target's
                layers >= m have zero o_proj / down_proj (scripts/make_spec_pair.py), the draft
                is its first m layers: acceptance ~100% (lowered by --pair-noise) at a draft
                cost of m / L. The target then has real weights for every config of the run.

Reported per run: wall time, output tokens/s, time per output token per request, and the
measured acceptance (accepted / drafted, mean acceptance length). Models are the bench_throughput
presets with random weights (load_format dummy), so nothing is downloaded:

    python scripts/bench_spec.py --preset llama-3.1-8b --batch-sizes 1 64 --k 3
    python scripts/bench_spec.py --preset llama-3.1-8b --batch-sizes 1 64 --k 4 --pair-layers 2
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import PRESETS, make_preset  # noqa: E402


def unrelated_draft(target_dir: str) -> str:
    """A 2-layer model with the target's config otherwise (same vocab, different weights)."""
    from workers.demo import build_tokenizer

    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    out = Path(target_dir + "-draft2")
    out.mkdir(exist_ok=True)
    build_tokenizer(out)
    (out / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    return str(out)


def make_pair(preset: str, layers: int, noise: float) -> dict[str, str]:
    """Target / draft folders from scripts/make_spec_pair.py (in a child process, so this one
    holds no CUDA context while the engine runs)."""
    import torch

    out = tempfile.mkdtemp(prefix=f"spec-pair-{preset}-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    script = Path(__file__).resolve().parent / "make_spec_pair.py"
    done = subprocess.run([sys.executable, str(script), "--preset", preset, "--out", out,
                           "--draft-layers", str(layers), "--noise", str(noise),
                           "--device", device], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"make_spec_pair.py failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def configs(target: str, k: int, which: list[str], pair_draft: str | None = None
            ) -> dict[str, dict]:
    if pair_draft is not None and "unrelated" in which:
        raise SystemExit("--pair-layers: the 'unrelated' config needs dummy weights; drop it")
    if pair_draft is None and "pair" in which:
        raise SystemExit("the 'pair' config needs --pair-layers")
    all_configs = {
        "none": {},
        "none-sync": {"async_scheduling": False},
        "self": {"speculative_config": {"method": "draft_model", "model": target,
                                        "num_speculative_tokens": k}},
        "unrelated": {"speculative_config": {"method": "draft_model",
                                             "model": unrelated_draft(target),
                                             "num_speculative_tokens": k}}
        if "unrelated" in which else {},
        "pair": {"speculative_config": {"method": "draft_model", "model": pair_draft,
                                        "num_speculative_tokens": k}},
        "ngram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": k,
                                         "prompt_lookup_min": 2, "prompt_lookup_max": 4}},
    }
    return {name: all_configs[name] for name in which}


def run(llm, batch_size: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    from frontend import SamplingParams

    rng = random.Random(batch_size)
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(prompt_len)]}
               for _ in range(batch_size)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                             detokenize=False), use_tqdm=False)  # warm-up
    before = llm.get_stats()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.get_stats()
    drafts = after.spec_num_drafts - before.spec_num_drafts
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"batch_size": batch_size, "elapsed_s": round(elapsed, 3),
            "output_tok_s": round(out_tokens / elapsed, 1),
            "ms_per_token_per_request": round(1e3 * elapsed / new_tokens, 2),
            "drafted": drafted, "accepted": accepted,
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "mean_acceptance_length": round(1 + accepted / drafts, 2) if drafts else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--configs", nargs="+", help="default: none none-sync self unrelated "
                    "ngram; with --pair-layers: none none-sync pair")
    ap.add_argument("--pair-layers", type=int, help="m: build the controlled-acceptance pair "
                    "(target layers >= m zeroed, draft = first m layers)")
    ap.add_argument("--pair-noise", type=float, default=0.0,
                    help="std of the pair target's o_proj/down_proj in layers >= m")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from frontend import LLM

    pair = None
    if args.pair_layers is not None:
        pair = make_pair(args.preset, args.pair_layers, args.pair_noise)
        print("pair:", json.dumps(pair), flush=True)
    which = args.configs or (["none", "none-sync", "pair"] if pair else
                             ["none", "none-sync", "self", "unrelated", "ngram"])
    target = pair["target"] if pair else make_preset(args.preset)
    vocab = PRESETS[args.preset]["vocab_size"]
    results: dict = {"preset": args.preset, "k": args.k, "pair_layers": args.pair_layers,
                     "pair_noise": args.pair_noise, "runs": {}}
    for name, extra in configs(target, args.k, which, pair and pair["draft"]).items():
        llm = LLM(target, load_format="auto" if pair else "dummy",
                  max_model_len=args.max_model_len, max_num_seqs=max(args.batch_sizes), **extra)
        try:
            results["runs"][name] = [run(llm, bs, args.prompt_len, args.new_tokens, vocab)
                                     for bs in args.batch_sizes]
        finally:
            llm.shutdown()
        print(name, json.dumps(results["runs"][name]), flush=True)
    print("\n| config | bs | tok/s | ms/token/request | acceptance | mean accept len |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in results["runs"].items():
        for r in rows:
            print(f"| {name} | {r['batch_size']} | {r['output_tok_s']} | "
                  f"{r['ms_per_token_per_request']} | {r['acceptance']} | "
                  f"{r['mean_acceptance_length']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
