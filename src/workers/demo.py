"""Build small random checkpoints (with a real tokenizer) that need no download.

Tests use the "tiny" preset; the server's default model is the "demo" preset, built once and cached
by `python -m workers.demo --out DIR`. The tokenizer is a byte-level BPE trained here on a fixed,
seeded corpus, so the same call always produces byte-identical files; the weights come from
transformers' own initialisation under a fixed torch seed and are saved with `save_pretrained`,
so the folder is an ordinary HF checkpoint that `AutoModelForCausalLM`/`AutoTokenizer` load.

A marker file written last makes a second build of the same spec into the same folder a no-op.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)
VOCAB_SIZE = 1000
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKER = ".tinyllm-complete"
_FORMAT = 1  # bump when the files this module writes change

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=2048),
    "demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 max_position_embeddings=4096),
}

# Per-architecture choices that make each tiny model exercise its family's quirks.
_ARCHS: dict[str, tuple[str, dict]] = {
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=256))),
    # MoE: 8 or 4 experts (width 32; Mixtral's is intermediate_size), top-2, with the q/k/v
    # bias and norm switches of their dense siblings; Qwen2-MoE adds its shared expert,
    # Qwen3-MoE keeps layer 0 dense to exercise `mlp_only_layers`.
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        tie_word_embeddings=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", dict(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}

_ENGLISH = """the of and to in is it that was for on are with as his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
model token server cache block request stream queue kernel memory batch engine prompt answer
question hello thanks please sorry yes json list value key true false null system user assistant
""".split()
_CONSONANTS = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl".split()
_VOWELS = "a e i o u ai ea oo ou y".split()


def _corpus(seed: int = 0) -> list[str]:
    # English words give realistic merges; seeded nonsense words keep pairs coming until the
    # trainer reaches the full vocab.
    rng = random.Random(seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    made_up = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(1500)]
    punct = [".", ",", "?", "!", ":", ";", ""]
    lines = []
    for _ in range(5000):
        words = [rng.choice(_ENGLISH) if rng.random() < 0.7 else rng.choice(made_up)
                 for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 10000)))
        lines.append(" ".join(words) + rng.choice(punct))
    return lines


@functools.cache
def _trained_tokenizer_json() -> str:
    # Training takes about a second; every build in a process reuses the result.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def build_tokenizer(out_dir: str | Path) -> str:
    """Save the demo tokenizer (byte-level BPE, chat template) into out_dir; return its path."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf_tok.chat_template = CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_checkpoint(out_dir: str | Path, arch: str = "qwen3", seed: int = 0,
                          preset: str = "tiny", **overrides: object) -> str:
    """Build (or reuse) a random `arch` checkpoint with the demo tokenizer; return its path."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(_ARCHS)}")
    out = Path(out_dir)
    spec = {"format": _FORMAT, "arch": arch, "seed": seed, "preset": preset,
            "overrides": overrides}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return str(out)
    marker.unlink(missing_ok=True)
    build_tokenizer(out)
    _save_random_model(out, arch, seed, {**PRESETS[preset], **overrides})
    marker.write_text(json.dumps(spec))
    return str(out)


def _save_random_model(out: Path, arch: str, seed: int, sizes: dict) -> None:
    # Imported here: a cached build (the server's usual case) should not pay for torch.
    import torch
    import transformers

    config_name, arch_kwargs = _ARCHS[arch]
    # initializer_range 0.1, not HF's 0.02: at 0.02 a tied tiny model's greedy choice is just
    # its last input token, which would hide attention and KV-cache bugs from every e2e test.
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, **{**arch_kwargs, **sizes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out))
    finally:
        if bar_was_on:
            transformers.utils.logging.enable_progress_bar()
    # Chat turns end with <|im_end|>: generation stops on either it or <|eos|>.
    transformers.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID],
                                  pad_token_id=PAD_ID).save_pretrained(str(out))


def main(argv: list[str] | None = None, default_preset: str = "demo") -> None:
    """CLI: build a checkpoint into --out and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--arch", default="qwen3", choices=sorted(_ARCHS))
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_checkpoint(args.out, arch=args.arch, seed=args.seed, preset=args.preset))


if __name__ == "__main__":
    main()
