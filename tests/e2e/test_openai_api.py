"""The official `openai` client (sync and async, streaming and not) against the real server.

One server for the module: `python -m frontend serve TINY --api-key ... --served-model-name tiny
alias`, one API server. Greedy decoding makes every result reproducible, so streams are checked
against the non-streamed answer to the same request.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from e2e_server import TINY_ENGINE_FLAGS, http

KEY = "sk-test-key"
MODEL = "tiny"
PROMPT = "the model token server cache"
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there, what is the cache?"}]


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    return server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--api-key", KEY,
                           "--served-model-name", MODEL, "alias"])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(**kw) -> dict:
    return {"model": MODEL, "temperature": 0.0, "max_tokens": 12, **kw}


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "alias"]
    assert http("GET", server.url + "/health")[0] == 200  # no key needed outside /v1
    status, body = http("GET", server.url + "/version")
    assert status == 200 and body["version"]


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(prompt=PROMPT, **greedy())
    assert full.id.startswith("cmpl-") and full.model == MODEL
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **greedy()))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(messages=MESSAGES, **greedy())
    assert full.id.startswith("chatcmpl-")
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(client.chat.completions.create(
        messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_async_client_matches_sync(server, client):
    sync_completion = client.completions.create(prompt=PROMPT, **greedy()).choices[0].text
    sync_chat = client.chat.completions.create(messages=MESSAGES, **greedy())
    sync_chat_text = sync_chat.choices[0].message.content

    async def run() -> tuple[str, str, str, str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def stream_completion() -> str:
            stream = await aclient.completions.create(prompt=PROMPT, stream=True, **greedy())
            return "".join([c.choices[0].text async for c in stream])

        async def stream_chat() -> str:
            stream = await aclient.chat.completions.create(messages=MESSAGES, stream=True,
                                                           **greedy())
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        async def completion() -> str:
            return (await aclient.completions.create(prompt=PROMPT, **greedy())).choices[0].text

        async def chat() -> str:
            out = await aclient.chat.completions.create(messages=MESSAGES, **greedy())
            return out.choices[0].message.content

        try:
            return await asyncio.gather(completion(), stream_completion(), chat(), stream_chat())
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    assert list(texts) == [sync_completion, sync_completion, sync_chat_text, sync_chat_text]


def test_n_echo_and_logprobs(client):
    out = client.completions.create(prompt="hello world", n=2, echo=True, logprobs=2,
                                    **greedy(max_tokens=5))
    num_prompt = out.usage.prompt_tokens
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text  # greedy
    for choice in out.choices:
        assert choice.text.startswith("hello world")
        lp = choice.logprobs
        num_tokens = num_prompt + 5 if choice.finish_reason == "length" else len(lp.tokens)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_tokens
        assert "".join(lp.tokens[:num_prompt]) == "hello world"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0.0 for v in lp.token_logprobs[1:])
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert out.usage.completion_tokens == sum(
        len(c.logprobs.tokens) - num_prompt for c in out.choices)


def test_chat_top_logprobs(client):
    out = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=3,
                                         **greedy(max_tokens=6))
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
        assert entry.logprob == pytest.approx(values[0])
    assert "".join(e.token for e in content) == out.choices[0].message.content


def test_batched_prompts_with_n(client):
    prompts = ["one two three", "water air earth fire"]
    singles = [client.completions.create(prompt=p, **greedy(max_tokens=6)).choices[0].text
               for p in prompts]
    out = client.completions.create(prompt=prompts, n=2, **greedy(max_tokens=6))
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [singles[0], singles[0], singles[1], singles[1]]


def test_stop_string_ends_completion(client):
    full = client.completions.create(prompt=PROMPT, **greedy(max_tokens=16)).choices[0].text
    # A two-character stop whose first occurrence is not at the start.
    at = next(i for i in range(1, len(full) - 1) if full.find(full[i:i + 2]) == i)
    stop = full[at:at + 2]
    out = client.completions.create(prompt=PROMPT, stop=[stop], **greedy(max_tokens=16))
    choice = out.choices[0]
    assert choice.text == full[:at] and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    chunks = client.completions.create(prompt=PROMPT, stop=stop, stream=True,
                                       **greedy(max_tokens=16))
    assert "".join(c.choices[0].text for c in chunks) == full[:at]


def test_vllm_extras_in_body(client):
    reference = client.completions.create(prompt=PROMPT, **greedy(max_tokens=8))
    out = client.completions.create(
        prompt=PROMPT, **greedy(max_tokens=8, temperature=1.0),
        extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": True,
                    "vllm_xargs": {"note": "x"}, "priority": 0, "cache_salt": "salt"})
    assert out.choices[0].text == reference.choices[0].text  # top_k=1 is greedy
    assert out.usage.completion_tokens == 8  # ignore_eos


def test_prefix_cache_reports_cached_tokens(client):
    prompt = " ".join(["model token server cache block request stream"] * 6)
    client.completions.create(prompt=prompt, **greedy(max_tokens=2))
    again = client.completions.create(prompt=prompt, **greedy(max_tokens=2))
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_api_key_is_required_on_v1(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(prompt=PROMPT, **greedy())
    status, body = http("POST", server.url + "/v1/completions", {"prompt": "hi"})
    assert status == 401 and body["error"]["code"] == 401
    assert http("GET", server.url + "/metrics")[0] == 200


def test_tokenize_detokenize_and_chat_template(server, client):
    status, body = http("POST", server.url + "/tokenize", {"prompt": "hello world"})
    assert status == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"]
    status, text = http("POST", server.url + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and text == {"prompt": "hello world"}
    with_gen = http("POST", server.url + "/tokenize", {"messages": MESSAGES})[1]
    without = http("POST", server.url + "/tokenize",
                   {"messages": MESSAGES, "add_generation_prompt": False})[1]
    assert with_gen["tokens"][:without["count"]] == without["tokens"]
    assert with_gen["count"] > without["count"]
    chat = client.chat.completions.create(messages=MESSAGES, **greedy(max_tokens=2))
    assert chat.usage.prompt_tokens == with_gen["count"]
    # chat_template_kwargs reach the template.
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = http("POST", server.url + "/tokenize", {
        "messages": [{"role": "user", "content": "world"}], "chat_template": template,
        "chat_template_kwargs": {"greeting": "hello "}})[1]["tokens"]
    assert http("POST", server.url + "/detokenize", {"tokens": ids})[1]["prompt"] == "hello world"
