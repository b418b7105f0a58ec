"""Qwen2-VL against transformers on a tiny random checkpoint (fp32, CPU): the preprocessing, the
model's logits, and the whole engine (chunked prefill across image placeholders, encoder cache,
prefix cache) with greedy generation, for one image, two images and a video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from enginecore.config import MultiModalConfig
from frontend.multimodal import MultiModalProcessor
from frontend.offline import LLM
from sampling.params import SamplingParams
from workers.attention import AttnMetadata, set_forward_context
from workers.demo_vl import (
    IMAGE_PAD_ID,
    PREPROCESSOR,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    build_tiny_vl_checkpoint,
)
from workers.models import load_model

ATOL = 1e-4
IMG = [VISION_START_ID, IMAGE_PAD_ID, VISION_END_ID]
VID = [VISION_START_ID, VIDEO_PAD_ID, VISION_END_ID]


def image(seed: int, height: int = 56, width: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_vl_checkpoint(tmp_path_factory.mktemp("tiny-vl"))


@pytest.fixture(scope="module")
def hf(vl_dir: str) -> torch.nn.Module:
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        vl_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def proc(vl_dir: str) -> MultiModalProcessor:
    return MultiModalProcessor(vl_dir, MultiModalConfig())


# Prompts: (token ids with one pad per item, multi_modal_data)
CASES = {
    "one_image": ([5, 6, 7, *IMG, 8, 9, 10, 11], {"image": image(1, 56, 84)}),
    "two_images": ([5, *IMG, 12, 13, *IMG, 14, 15], {"image": [image(2), image(3, 84, 56)]}),
    "video": ([5, 6, *VID, 16, 17, 18], {"video": [image(4), image(5), image(6), image(7)]}),
}


def hf_inputs(ids: list[int], mm: list) -> dict[str, torch.Tensor]:
    """transformers' keyword inputs for our expanded prompt and its MMInputs."""
    out: dict[str, torch.Tensor] = {"input_ids": torch.tensor([ids])}
    kinds = {IMAGE_PAD_ID: 1, VIDEO_PAD_ID: 2}
    out["mm_token_type_ids"] = torch.tensor([[kinds.get(t, 0) for t in ids]])
    for modality, key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        items = [m for m in mm if m.modality == modality]
        if items:
            out[key] = torch.cat([torch.from_numpy(
                np.frombuffer(m.data, np.float32).reshape(m.shape).copy()) for m in items])
            out[grid_key] = torch.tensor([m.grid_thw for m in items])
    return out


def test_preprocessing_matches_transformers(proc: MultiModalProcessor) -> None:
    hp = transformers.Qwen2VLImageProcessorPil(min_pixels=PREPROCESSOR["min_pixels"],
                                               max_pixels=PREPROCESSOR["max_pixels"])
    for img in (image(0), image(1, 70, 45), image(2, 300, 200)):
        ref = hp(images=[img], return_tensors="np")
        rows, grid = proc.spec.frames_to_rows([img])
        assert grid == ref["image_grid_thw"][0].tolist()
        np.testing.assert_allclose(rows, ref["pixel_values"], atol=1e-5)


def test_placeholder_expansion_and_errors(proc: MultiModalProcessor, vl_dir: str) -> None:
    ids, mm = proc.process([5, *IMG, 6, *IMG], {"image": [image(0), image(0, 112, 56)]})
    assert [(m.offset, m.length, m.grid_thw) for m in mm] == [(2, 4, [1, 4, 4]),
                                                              (9, 8, [1, 8, 4])]
    assert ids == [5, VISION_START_ID, *[IMAGE_PAD_ID] * 4, VISION_END_ID, 6, VISION_START_ID,
                   *[IMAGE_PAD_ID] * 8, VISION_END_ID]
    assert mm[0].hash != mm[1].hash
    again = proc.process([*IMG], {"image": image(0)})[1][0]
    assert again.hash == mm[0].hash  # content hash: equal pixels, equal key
    named = proc.process([*IMG, *IMG], {"image": [image(0), image(1)]},
                         {"image": ["my-cat", None]})[1]
    assert named[0].hash == "my-cat" and named[1].hash not in ("my-cat", mm[0].hash)
    with pytest.raises(ValueError, match="2 image item.*1 image placeholder"):
        proc.process([5, *IMG], {"image": [image(0), image(1)]})
    with pytest.raises(ValueError, match="multi_modal_data: unsupported modality 'audio'"):
        proc.process([5], {"audio": b""})
    limited = MultiModalProcessor(vl_dir, MultiModalConfig(limit_mm_per_prompt={"image": 1}))
    with pytest.raises(ValueError, match="2 image items; at most 1 per prompt"):
        limited.process([*IMG, *IMG], {"image": [image(0), image(1)]})
    with pytest.raises(ValueError, match="exceeds the 100-pixel limit"):
        MultiModalProcessor(vl_dir, MultiModalConfig(max_image_pixels=100)).process(
            [*IMG], {"image": image(0)})


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_logits_match_transformers(case: str, vl_dir: str, hf: torch.nn.Module,
                                         proc: MultiModalProcessor) -> None:
    prompt, data = CASES[case]
    ids, mm = proc.process(prompt, data)
    model = load_model(vl_dir, torch.float32, "cpu")
    embeds = model.embed_input_ids(torch.tensor(ids))
    for m in mm:
        pix = torch.from_numpy(np.frombuffer(m.data, np.float32).reshape(m.shape).copy())
        embeds[m.offset:m.offset + m.length] = model.encode(pix, [m.grid_thw])
    positions, _ = model.mrope_positions(len(ids), [(m.offset, m.grid_thw) for m in mm])
    block_size, n = 4, len(ids)
    model.bind_kv_cache([torch.zeros(model.kv_cache_shape(16, block_size))
                         for _ in range(model.num_layers)])
    blocks = list(range(1, -(-n // block_size) + 1))
    meta = AttnMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        slot_mapping=torch.arange(block_size, block_size + n), max_query_len=n, max_seq_len=n)
    with torch.inference_mode(), set_forward_context(meta):
        logits = model.compute_logits(model(torch.tensor(ids), torch.from_numpy(positions),
                                            inputs_embeds=embeds))
    with torch.inference_mode():
        ref = hf(**hf_inputs(ids, mm)).logits[0]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    # The media matter: other pixels give other logits.
    with torch.inference_mode():
        other = hf_inputs(ids, mm)
        key = "pixel_values" if "pixel_values" in other else "pixel_values_videos"
        other[key] = other[key] * 0.5
        assert (hf(**other).logits[0] - ref).abs().max() > 1e-3


def hf_greedy(hf: torch.nn.Module, ids: list[int], mm: list, max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(**hf_inputs(ids, mm), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_engine_greedy_matches_transformers(vl_dir: str, hf: torch.nn.Module,
                                            proc: MultiModalProcessor) -> None:
    """Small token budget: prefill chunks cut through the placeholders (8 tokens per step, a
    112x112 image has 16); the second request with the same image hits the prefix cache."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    cases = dict(CASES)
    cases["big_image"] = ([5, 6, *IMG, 7, 8], {"image": image(9, 112, 112)})
    expected = {}
    for name, (prompt, data) in cases.items():
        ids, mm = proc.process(prompt, data)
        expected[name] = hf_greedy(hf, ids, mm, 6)
    with LLM(vl_dir, max_num_batched_tokens=8, max_num_encoder_input_tokens=16,
             encoder_cache_size=24, block_size=4) as llm:
        prompts = [{"prompt_token_ids": p, "multi_modal_data": d} for p, d in cases.values()]
        outs = llm.generate(prompts, params, use_tqdm=False)
        for name, out in zip(cases, outs, strict=True):
            assert out.outputs[0].token_ids == expected[name], name
        # Same image again: its blocks are found in the prefix cache, tokens unchanged.
        prompt, data = cases["big_image"]
        before = llm.get_stats()
        again = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": data}, params,
                             use_tqdm=False)[0]
        after = llm.get_stats()
        assert again.outputs[0].token_ids == expected["big_image"]
        assert again.num_cached_tokens >= 16
        assert after.prefix_cache_hits - before.prefix_cache_hits == again.num_cached_tokens
        # Same token ids, a different image: no block past the first placeholder is shared.
        other = llm.generate({"prompt_token_ids": prompt,
                              "multi_modal_data": {"image": image(10, 112, 112)}}, params,
                             use_tqdm=False)[0]
        assert other.num_cached_tokens <= 2
        ids, mm = proc.process(prompt, {"image": image(10, 112, 112)})
        assert other.outputs[0].token_ids == hf_greedy(hf, ids, mm, 6)
        # A prompt ending right after the image: the hit (capped one token short of the prompt)
        # stops inside the placeholders, so the rest of the image is encoded and sliced again.
        tail = [5, *IMG]
        ids, mm = proc.process(tail, {"image": image(9, 112, 112)})
        want = hf_greedy(hf, ids, mm, 6)
        for _ in range(2):
            out = llm.generate({"prompt_token_ids": tail,
                                "multi_modal_data": {"image": image(9, 112, 112)}}, params,
                               use_tqdm=False)[0]
            assert out.outputs[0].token_ids == want
        assert out.num_cached_tokens == 16 and mm[0].offset < 16 < mm[0].offset + mm[0].length
        # A text prompt with the placeholder written out, as in vLLM's examples.
        text = "look <|vision_start|><|image_pad|><|vision_end|> what is it"
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": image(11)}}, params,
                           use_tqdm=False)[0]
        ids, mm = proc.process(llm.engine.tokenizer.encode(text), {"image": image(11)})
        assert len(mm) == 1 and out.outputs[0].token_ids == hf_greedy(hf, ids, mm, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_matches_transformers(vl_dir: str, hf: torch.nn.Module,
                                             proc: MultiModalProcessor) -> None:
    """The same prompts through the CUDA path (Triton kernels, CUDA graphs for decode)."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [hf_greedy(hf, *proc.process(p, d), 6) for p, d in CASES.values()]
    with LLM(vl_dir, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 26,
             max_num_batched_tokens=8, max_num_encoder_input_tokens=16) as llm:
        prompts = [{"prompt_token_ids": p, "multi_modal_data": d} for p, d in CASES.values()]
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_encoder_profile_run_shapes(vl_dir: str) -> None:
    """Memory profiling encodes the largest square image the encoder budget allows."""
    from workers.multimodal import MultiModalRunner

    runner = MultiModalRunner(load_model(vl_dir, torch.float32, "cpu"), torch.device("cpu"))
    runner.profile(20)  # 4x4 merged tokens: a 112x112 image
    assert runner.cache == {}


def test_item_larger_than_the_encoder_budget_is_rejected_up_front(vl_dir: str) -> None:
    from enginecore.config import EngineConfig
    from frontend.processor import Processor
    from frontend.tokenizer import Tokenizer

    processor = Processor(EngineConfig.create(vl_dir, max_num_batched_tokens=8),
                          Tokenizer.from_pretrained(vl_dir))
    _, ids, mm = processor.process_prompt({"prompt_token_ids": [5, *IMG],
                                           "multi_modal_data": {"image": image(0, 112, 112)}})
    with pytest.raises(ValueError, match="image of 16 tokens exceeds the encoder budget of 8"):
        processor.make_request("r", ids, SamplingParams(), mm_inputs=mm)
    processor.mm = None  # as for a text-only checkpoint
    with pytest.raises(ValueError, match="multi_modal_data: this model takes text only"):
        processor.process_prompt({"prompt": "hi", "multi_modal_data": {"image": image(0)}})
