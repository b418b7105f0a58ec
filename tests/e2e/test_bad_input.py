"""Bad input: every case answers a 4xx with OpenAI's error shape, and the server stays healthy.

Raw HTTP (urllib), since the point is bodies that a typed client would refuse to send.
"""

from __future__ import annotations

import pytest
from e2e_server import http

from frontend.server import MAX_BODY_BYTES

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (id, method, path, body, status, param the error names or None when any)
CASES = [
    ("malformed-json", "POST", C, b'{"prompt": "hi",', 400, None),
    ("empty-body", "POST", C, b"", 400, None),
    ("not-utf8", "POST", C, b'{"prompt": "\xff\xfe"}', 400, None),
    ("json-array", "POST", C, b"[1, 2]", 400, None),
    ("missing-prompt", "POST", C, {"max_tokens": 3}, 400, "prompt"),
    ("prompt-wrong-type", "POST", C, {"prompt": 5}, 400, "prompt"),
    ("prompt-mixed-list", "POST", C, {"prompt": ["a", 1]}, 400, "prompt"),
    ("prompt-empty-string", "POST", C, {"prompt": ""}, 400, None),
    ("prompt-empty-list", "POST", C, {"prompt": []}, 400, "prompt"),
    ("prompt-too-long", "POST", C, {"prompt": [7] * 1024}, 400, "prompt"),
    # 40 blocks (one reserved) hold 624 tokens, below --max-model-len: the KV cache binds.
    ("prompt-over-kv-capacity", "POST", C, {"prompt": [7] * 624}, 400, "prompt"),
    ("chat-over-kv-capacity", "POST", CHAT, {"messages": [
        {"role": "user", "content": "cache " * 700}]}, 400, "messages"),
    ("token-outside-vocab", "POST", C, {"prompt": [5, 10**6]}, 400, None),
    ("max-tokens-string", "POST", C, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("max-tokens-zero", "POST", C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-over-context", "POST", C, {"prompt": "hi", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("temperature-negative", "POST", C, {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("top-p-zero", "POST", C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("presence-penalty-range", "POST", C, {"prompt": "hi", "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("n-zero", "POST", C, {"prompt": "hi", "n": 0}, 400, "n"),
    ("n-huge", "POST", C, {"prompt": "hi", "n": 100000}, 400, "n"),
    ("logprobs-too-many", "POST", C, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("logit-bias-bad-key", "POST", C, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400,
     "logit_bias"),
    ("stop-not-strings", "POST", C, {"prompt": "hi", "stop": [1]}, 400, "stop"),
    ("stream-options-without-stream", "POST", C,
     {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("suffix", "POST", C, {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("best-of", "POST", C, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("unknown-model", "POST", C, {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("chat-missing-messages", "POST", CHAT, {"max_tokens": 3}, 400, "messages"),
    ("chat-bad-role", "POST", CHAT, {"messages": [{"role": "king", "content": "x"}]}, 400,
     "messages"),
    ("chat-image", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400,
     "messages"),
    ("chat-top-logprobs-without-logprobs", "POST", CHAT, {"messages": USER, "top_logprobs": 2},
     400, "top_logprobs"),
    ("chat-response-format", "POST", CHAT,
     {"messages": USER, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("chat-template-syntax", "POST", CHAT, {"messages": USER, "chat_template": "{% for %}"},
     400, None),
    ("chat-template-kwargs-clash", "POST", CHAT,
     {"messages": USER, "chat_template_kwargs": {"messages": 1}}, 400, None),
    ("chat-unknown-model", "POST", CHAT, {"messages": USER, "model": "nope"}, 404, "model"),
    ("get-on-post-route", "GET", C, None, 405, None),
    ("unknown-route", "POST", "/v1/embeddings-nope", {"input": "x"}, 404, None),
    ("tokenize-neither", "POST", "/tokenize", {"model": None}, 400, None),
    ("detokenize-outside-vocab", "POST", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("body-too-large", "POST", C, b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}', 413, None),
]


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    return server_factory([tiny_model_dir, "--num-gpu-blocks-override", "40",
                           "--max-model-len", "1024"])


def test_table_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "param"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_answers_4xx(server, name, method, path, body, status, param):
    got, answer = http(method, server.url + path, body,
                       headers={"Content-Type": "application/json"})
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == status and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error


def test_limits_follow_kv_capacity(server):
    status, models = http("GET", server.url + "/v1/models")
    assert status == 200 and models["data"][0]["max_model_len"] == 39 * 16
    status, body = http("POST", server.url + C, {"prompt": [7] * 600, "max_tokens": 23,
                                                  "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 23  # 623 tokens fit


def test_server_healthy_after_bad_input(server):
    for _, method, path, body, _, _ in CASES:  # again, back to back
        http(method, server.url + path, body)
    assert http("GET", server.url + "/health")[0] == 200
    status, body = http("POST", server.url + C, {"prompt": "hello", "max_tokens": 3,
                                                  "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
