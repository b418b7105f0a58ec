"""A tiny random Qwen2-VL checkpoint (vision tower + M-RoPE decoder) with the demo tokenizer.

The demo tokenizer gets the four vision tokens as special tokens and a chat template that writes
`<|vision_start|><|image_pad|><|vision_end|>` for an image part (`<|video_pad|>` for a video), as
Qwen2-VL's does. Images of 56x56 pixels become a 4x4 patch grid: 4 merged tokens each.

    python -m workers.demo_vl --out /tmp/tiny-qwen2-vl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.demo import BOS_ID, EOS_ID, IM_END_ID, PAD_ID, VOCAB_SIZE, _trained_tokenizer_json

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = range(VOCAB_SIZE, VOCAB_SIZE + 4)
VL_VOCAB_SIZE = VOCAB_SIZE + 8
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREPROCESSOR = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}
_MARKER = ".tinyllm-vl-complete"


def build_vl_tokenizer(out_dir: str | Path) -> str:
    """Save the demo tokenizer plus the vision tokens and the VL chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *VISION_TOKENS])
    assert hf_tok.convert_tokens_to_ids(VISION_TOKENS) == list(range(VOCAB_SIZE, VOCAB_SIZE + 4))
    hf_tok.chat_template = VL_CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_vl_checkpoint(out_dir: str | Path, seed: int = 0) -> str:
    """Build (or reuse) the tiny random Qwen2-VL checkpoint; return its path."""
    out = Path(out_dir)
    if (out / _MARKER).is_file():
        return str(out)
    import torch
    import transformers

    build_vl_tokenizer(out)
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=VL_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.1,
            rope_parameters={"rope_type": "default", "type": "mrope", "rope_theta": 10000.0,
                             "mrope_section": [2, 3, 3]},
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           initializer_range=0.1),
        image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(str(out))
    transformers.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID],
                                  pad_token_id=PAD_ID).save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (out / _MARKER).write_text("1")
    return str(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    print(build_tiny_vl_checkpoint(parser.parse_args().out))
