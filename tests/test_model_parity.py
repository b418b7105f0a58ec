"""Our model path (loader, layers, paged attention) against transformers, fp32, on CPU.

`PagedBatcher` drives the model the way the runner does: a flat token batch, per-sequence block
tables over a shared paged KV cache (block ids shuffled so nothing is accidentally contiguous), and
the metadata set through the forward context.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.attention import AttnMetadata, get_forward_context, set_forward_context
from workers.demo import _trained_tokenizer_json, build_tiny_checkpoint, build_tokenizer
from workers.layers import rope_parameters
from workers.models import load_model

ARCHS = ("llama", "qwen2", "qwen3")
ATOL = 1e-4


class PagedBatcher:
    """Runs forward steps of several sequences against one paged KV cache, like the runner."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4,
                 seed: int = 0) -> None:
        self.model, self.block_size = model, block_size
        shape = model.kv_cache_shape(num_blocks, block_size)
        model.bind_kv_cache([torch.zeros(shape) for _ in range(model.num_layers)])
        self.free = list(range(1, num_blocks))  # block 0 is the table padding value
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, batch: list[tuple[str, list[int]]]) -> torch.Tensor:
        """Append each (seq, new tokens) to its sequence; return logits [T, V] of all new tokens."""
        ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
        for seq, tokens in batch:
            start = self.lens.get(seq, 0)
            end = self.lens[seq] = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end)]
            qsl.append(qsl[-1] + len(tokens))
            seq_lens.append(end)
        max_blocks = max(len(self.tables[seq]) for seq, _ in batch)
        tables = [self.tables[seq] + [0] * (max_blocks - len(self.tables[seq]))
                  for seq, _ in batch]
        meta = AttnMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(len(t) for _, t in batch), max_seq_len=max(seq_lens))
        with torch.inference_mode(), set_forward_context(meta):
            hidden = self.model(torch.tensor(ids), torch.tensor(positions))
            return self.model.compute_logits(hidden)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(5, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hf_models(tiny_models: dict[str, str]) -> dict[str, torch.nn.Module]:
    return {arch: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for arch, path in tiny_models.items()}


def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0].float()


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_single_prefill(arch: str, tiny_models: dict[str, str], hf_models: dict) -> None:
    model = load_model(tiny_models[arch], torch.float32, "cpu")
    tokens = prompt(11, seed=1)
    logits = PagedBatcher(model).step([("a", tokens)])
    assert logits.dtype == torch.float32 and logits.shape == (11, 1000)
    torch.testing.assert_close(logits, hf_logits(hf_models[arch], tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_varlen_prefill(arch: str, tiny_models: dict[str, str], hf_models: dict) -> None:
    model = load_model(tiny_models[arch], torch.float32, "cpu")
    prompts = {"a": prompt(9, seed=2), "b": prompt(3, seed=3), "c": prompt(14, seed=4)}
    logits = PagedBatcher(model).step(list(prompts.items()))
    start = 0
    for tokens in prompts.values():
        ours = logits[start:start + len(tokens)]
        torch.testing.assert_close(ours, hf_logits(hf_models[arch], tokens), atol=ATOL, rtol=0)
        start += len(tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_then_greedy_decode(arch: str, tiny_models: dict[str, str],
                                            hf_models: dict) -> None:
    hf = hf_models[arch]
    model = load_model(tiny_models[arch], torch.float32, "cpu")
    batcher = PagedBatcher(model, seed=7)
    tokens = prompt(13, seed=5)
    full = hf_logits(hf, tokens)
    for lo, hi in ((0, 5), (5, 9), (9, 13)):
        logits = batcher.step([("a", tokens[lo:hi])])
        torch.testing.assert_close(logits, full[lo:hi], atol=ATOL, rtol=0)
    generated = [int(logits[-1].argmax())]
    for _ in range(5):
        logits = batcher.step([("a", generated[-1:])])
        expected = hf_logits(hf, tokens + generated)[-1]
        torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
        generated.append(int(logits[0].argmax()))
    with torch.inference_mode():
        out = hf.generate(torch.tensor([tokens]), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert generated == out[0, len(tokens):].tolist()
    assert len(set(generated)) > 1, "greedy output should depend on the context"


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_decode_and_prefill_batch(arch: str, tiny_models: dict[str, str],
                                        hf_models: dict) -> None:
    """Continuous batching: one sequence decodes while another prefills a chunk after a prefix."""
    model = load_model(tiny_models[arch], torch.float32, "cpu")
    batcher = PagedBatcher(model, seed=3)
    a, b = prompt(6, seed=8), prompt(10, seed=9)
    batcher.step([("a", a), ("b", b[:4])])
    logits = batcher.step([("a", [17]), ("b", b[4:])])
    hf = hf_models[arch]
    torch.testing.assert_close(logits[0], hf_logits(hf, a + [17])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], hf_logits(hf, b)[4:], atol=ATOL, rtol=0)


def test_llama_with_attention_and_mlp_bias(tmp_path: Path) -> None:
    path = build_tiny_checkpoint(tmp_path / "llama-bias", arch="llama", attention_bias=True,
                                 mlp_bias=True, num_key_value_heads=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = load_model(path, "float32", "cpu")
    tokens = prompt(8, seed=6)
    torch.testing.assert_close(PagedBatcher(model).step([("a", tokens)]), hf_logits(hf, tokens),
                               atol=ATOL, rtol=0)


def test_prefill_without_kv_cache_matches(tiny_model_dir: str, hf_models: dict) -> None:
    """Memory profiling runs the model before any cache is bound: plain causal prefill."""
    model = load_model(tiny_model_dir, torch.float32, "cpu")
    a, b = prompt(7, seed=10), prompt(5, seed=11)
    meta = AttnMetadata(
        query_start_loc=torch.tensor([0, 7, 12], dtype=torch.int32),
        seq_lens=torch.tensor([7, 5], dtype=torch.int32),
        block_tables=torch.zeros(2, 1, dtype=torch.int32),
        slot_mapping=torch.full((12,), -1, dtype=torch.int64), max_query_len=7, max_seq_len=7)
    with torch.inference_mode(), set_forward_context(meta):
        logits = model.compute_logits(model(torch.tensor(a + b), torch.tensor([*range(7),
                                                                                *range(5)])))
    hf = hf_models["qwen3"]
    torch.testing.assert_close(logits[:7], hf_logits(hf, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[7:], hf_logits(hf, b), atol=ATOL, rtol=0)


def test_bf16_close_to_fp32(tiny_model_dir: str) -> None:
    model = load_model(tiny_model_dir, "bfloat16", "cpu")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    tokens = prompt(9, seed=12)
    ours = PagedBatcher(model).step([("a", tokens)])
    ref = PagedBatcher(load_model(tiny_model_dir, torch.float32, "cpu")).step([("a", tokens)])
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------- forward context


def test_forward_context_is_not_reentrant() -> None:
    meta = AttnMetadata(torch.zeros(1), torch.zeros(0), torch.zeros(0, 1), torch.zeros(0), 0, 0)
    with pytest.raises(RuntimeError):
        get_forward_context()
    with set_forward_context(meta):
        assert get_forward_context() is meta
        with pytest.raises(AssertionError), set_forward_context(meta):
            pass
    with pytest.raises(RuntimeError):
        get_forward_context()


# ---------------------------------------------------------------- loader


def test_sharded_checkpoint_loads_identically(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded = load_model(tmp_path, torch.float32, "cpu").state_dict()
    single = load_model(tiny_models["qwen2"], torch.float32, "cpu").state_dict()
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.equal(sharded[name], tensor), name


def _copy_with_tensors(src: str, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_an_error(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    path = _copy_with_tensors(tiny_models["llama"], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight \['k'\]"):
        load_model(path, torch.float32, "cpu")


def test_unexpected_tensor_is_an_error(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    def add(tensors: dict) -> None:
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    path = _copy_with_tensors(tiny_models["llama"], tmp_path / "m", add)
    with pytest.raises(KeyError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(path, torch.float32, "cpu")


def test_wrong_shape_is_an_error(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    def shrink(tensors: dict) -> None:
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)

    path = _copy_with_tensors(tiny_models["llama"], tmp_path / "m", shrink)
    with pytest.raises(ValueError, match="up_proj"):
        load_model(path, torch.float32, "cpu")


def test_unknown_architecture_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tmp_path, torch.float32, "cpu")


def test_rope_parameters_legacy_and_v5_spellings() -> None:
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = rope_parameters({"rope_theta": 5e5, "rope_scaling": scaling})
    assert legacy["rope_type"] == "llama3" and legacy["rope_theta"] == 5e5
    assert legacy["factor"] == 8.0
    assert rope_parameters({"rope_theta": 1e6}) == {"rope_theta": 1e6, "rope_type": "default"}
    v5 = {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    assert rope_parameters(v5) == {"rope_theta": 1e4, "rope_type": "default"}


# ---------------------------------------------------------------- demo checkpoint and tokenizer


def test_tokenizer_loads_with_specials_and_chat_template(tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 1000
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Hello world, ünïcødé 🙂 42!"
    assert tok.decode(tok(text)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_training_is_deterministic(tmp_path: Path, tokenizer_dir: str) -> None:
    _trained_tokenizer_json.cache_clear()  # retrain for real
    build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (Path(tokenizer_dir) / name).read_bytes(), name


def test_build_is_cached_by_marker(tiny_model_dir: str) -> None:
    weights = Path(tiny_model_dir) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_checkpoint(Path(tiny_model_dir), arch="qwen3") == tiny_model_dir
    assert weights.stat().st_mtime_ns == before
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    generation = json.loads((Path(tiny_model_dir) / "generation_config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"]
    assert config["eos_token_id"] == 2 and generation["eos_token_id"] == [2, 4]
