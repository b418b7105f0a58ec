"""Prompt embeddings (`enable_prompt_embeds`) through the whole engine on CPU, against the same
prompt given as token ids; the base64 decoder of the completions API."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from transformers import AutoModelForCausalLM

from frontend import LLM, SamplingParams
from frontend.prompt_embeds import FLAG_OFF, decode_prompt_embeds, tensor_to_prompt_embeds

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
           [30, 31, 32], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def embed(tiny_model_dir):
    table = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32) \
        .get_input_embeddings()
    return lambda ids: table(torch.tensor(ids)).detach()


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # A small token budget: long embedding prompts are prefilled in chunks.
    with LLM(tiny_model_dir, enable_prompt_embeds=True, max_num_batched_tokens=8,
             max_num_seqs=4, kv_cache_memory_bytes=64 << 20) as llm:
        yield llm


def ids_of(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_embeds_give_the_same_tokens_as_ids(llm, embed):
    want = ids_of(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    mixed = [{"prompt_embeds": embed(PROMPTS[0])}, PROMPTS[1],
             {"prompt_embeds": embed(PROMPTS[2])[None]}]  # [1, L, H] is squeezed
    outs = llm.generate(mixed, GREEDY, use_tqdm=False)
    assert ids_of(outs) == want
    assert outs[0].prompt_token_ids == [0] * len(PROMPTS[0])  # placeholders
    # The embeddings are really used: the placeholder ids alone answer differently.
    assert ids_of(llm.generate([[0] * len(PROMPTS[0])], GREEDY, use_tqdm=False))[0] != want[0]


def test_prefix_cache_keys_on_the_embedding_bytes(llm, embed):
    first = embed(PROMPTS[0])
    llm.generate([{"prompt_embeds": first}], GREEDY, use_tqdm=False)
    again = llm.generate([{"prompt_embeds": first.clone()}], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 16
    other = first.clone()
    other[0, 0] += 1.0  # same length, same placeholder ids, different bytes: no hit
    miss = llm.generate([{"prompt_embeds": other}], GREEDY, use_tqdm=False)[0]
    assert miss.num_cached_tokens == 0


def test_bad_embeddings_are_rejected(llm, embed, tiny_model_dir):
    with pytest.raises(ValueError, match="hidden_size"):
        llm.generate([{"prompt_embeds": torch.zeros(3, 5)}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="dtype"):
        llm.generate([{"prompt_embeds": torch.zeros(3, 5, dtype=torch.int32)}], GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([{"prompt_embeds": embed([5, 6])}],
                     SamplingParams(prompt_logprobs=1), use_tqdm=False)
    with LLM(tiny_model_dir, max_num_seqs=2, kv_cache_memory_bytes=64 << 20) as plain:
        with pytest.raises(ValueError, match="enable-prompt-embeds"):
            plain.generate([{"prompt_embeds": embed([5, 6])}], GREEDY, use_tqdm=False)


def saved(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_prompt_embeds():
    t = torch.randn(4, 6, dtype=torch.bfloat16)
    got = decode_prompt_embeds(saved(t), 6)
    assert got == tensor_to_prompt_embeds(t, 6) and got.shape == [4, 6]
    assert got.dtype == "bfloat16" and len(got.data) == 4 * 6 * 2
    assert decode_prompt_embeds(saved(t.to_sparse()), 6).hash == got.hash
    with pytest.raises(ValueError, match="base64"):
        decode_prompt_embeds("not base64!!", 6)
    with pytest.raises(ValueError, match="cannot load"):
        decode_prompt_embeds(saved(torch.nn.Linear(2, 2)), 6)  # weights_only refuses a module
    with pytest.raises(ValueError, match="2-D"):
        decode_prompt_embeds(saved(torch.zeros(2, 3, 4, 6)), 6)
    assert FLAG_OFF.startswith("You must set `--enable-prompt-embeds`")


def test_prompt_embeds_cross_processes_as_plain_msgpack():
    import msgspec

    from enginecore.protocol import AddRequest, NewReq, core_input_decoder, encode

    embeds = tensor_to_prompt_embeds(torch.randn(3, 4), 4)
    add = AddRequest(request_id="r", prompt_token_ids=[0, 0, 0], sampling=SamplingParams(),
                     prompt_embeds=embeds)
    assert core_input_decoder.decode(encode(add)) == add
    new = NewReq("r", [0, 0, 0], SamplingParams(), [1], 0, prompt_embeds=embeds)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=NewReq) == new
