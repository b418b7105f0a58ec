"""GPU check of the multimodal path: the tiny Qwen2-VL through the engine on CUDA against
transformers on the CPU (fp32 greedy tokens), then a small image-request throughput figure.

Prompts: one image, two images, a 4-frame video and a 224x224 image (64 placeholder tokens);
variants: CUDA graphs, eager, and a small token / encoder budget that cuts prefill chunks through
the placeholders. A second pass over the same prompts must hit the prefix cache. Exits non-zero on
a mismatch.

    python scripts/check_gpu_multimodal.py [--bench-requests 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from PIL import Image

from enginecore.config import MultiModalConfig
from frontend import LLM, SamplingParams
from frontend.multimodal import MultiModalProcessor
from workers.demo_vl import (
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    build_tiny_vl_checkpoint,
)

MAX_NEW = 16
IMG = [VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID]
VID = [VISION_START_ID, VIDEO_PAD_ID, VISION_END_ID]


def image(seed: int, h: int = 56, w: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_greedy(hf, ids: list[int], mm: list) -> list[int]:
    kinds = {IMAGE_PAD_ID: 1, VIDEO_PAD_ID: 2}
    kw = {"input_ids": torch.tensor([ids]),
          "mm_token_type_ids": torch.tensor([[kinds.get(t, 0) for t in ids]])}
    for modality, key, grid in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
        items = [m for m in mm if m.modality == modality]
        if items:
            kw[key] = torch.cat([torch.from_numpy(np.frombuffer(m.data, np.float32)
                                                  .reshape(m.shape).copy()) for m in items])
            kw[grid] = torch.tensor([m.grid_thw for m in items])
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench-requests", type=int, default=64)
    args = parser.parse_args()
    path = build_tiny_vl_checkpoint(tempfile.mkdtemp())
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32).eval()
    proc = MultiModalProcessor(path, MultiModalConfig())
    cases = [([5, 6, *IMG, 7, 8], {"image": image(1, 56, 84)}),
             ([5, *IMG, 9, *IMG, 10], {"image": [image(2), image(3, 84, 56)]}),
             ([5, *VID, 11, 12], {"video": [image(4), image(5), image(6), image(7)]}),
             ([5, 6, *IMG, 7, 8], {"image": image(8, 224, 224)})]
    want = [hf_greedy(hf, *proc.process(p, d)) for p, d in cases]
    prompts = [{"prompt_token_ids": p, "multi_modal_data": d} for p, d in cases]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    variants = {"fp32 graphs": {}, "fp32 eager": {"enforce_eager": True},
                "fp32 small budget": {"max_num_batched_tokens": 16,
                                      "max_num_encoder_input_tokens": 64,
                                      "encoder_cache_size": 80, "block_size": 16}}
    failures = 0
    for name, kwargs in variants.items():
        with LLM(path, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28,
                 **kwargs) as llm:
            for attempt in ("cold", "cached"):
                outs = llm.generate(prompts, params, use_tqdm=False)
                got = [o.outputs[0].token_ids for o in outs]
                same = sum(g == w for g, w in zip(got, want, strict=True))
                hits = sum(o.num_cached_tokens for o in outs)
                print(f"{name:18s} {attempt:6s} sequences equal {same}/{len(cases)}, "
                      f"prefix-cached tokens {hits}")
                failures += same != len(cases) or (attempt == "cached" and hits == 0)
    with LLM(path, device="cuda", dtype="bfloat16", kv_cache_memory_bytes=1 << 28) as llm:
        reqs = [{"prompt_token_ids": [5, 6, *IMG, 7, 8],
                 "multi_modal_data": {"image": image(100 + i, 448, 448)}}
                for i in range(args.bench_requests)]
        llm.generate(reqs[:2], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(reqs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        print(f"bf16: {args.bench_requests} requests with a 448x448 image (resized to 224x224: "
              f"64 image tokens) "
              f"+ {MAX_NEW} new tokens: {elapsed:.2f} s, {args.bench_requests / elapsed:.1f} req/s")
    print("FAIL" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
