"""Security and resource limits of the API (the cases tests/e2e/test_bad_input.py does not cover):
`--max-logprobs`, the cap on choices per request (prompts x n), the API key (only /v1/*, any
wrong key refused, the OpenAPI document says so), the request-body timeout (408).
`--max-model-len` and the 16 MiB body limit are in test_bad_input.py.
"""

from __future__ import annotations

import socket
import time

import pytest
from e2e_server import TINY_ENGINE_FLAGS, http

from enginecore.config import EngineConfig
from frontend.serving import _MAX_CHOICES

C, CHAT = "/v1/completions", "/v1/chat/completions"
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    return server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--max-logprobs", "2",
                           "--api-key", KEY, "--request-body-timeout", "1"])


def test_slow_request_body_gets_408_and_frees_the_handler(server):
    # Headers promise 100 bytes, 10 arrive, then nothing: the server answers 408 in ~1 s instead
    # of holding the handler open, and keeps serving others.
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {C} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     '{"prompt":'.encode())
        start = time.monotonic()
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert time.monotonic() - start < 5
    status, _ = http("POST", server.url + C, {"prompt": "hi", "max_tokens": 1}, headers=AUTH)
    assert status == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    (C, {"prompt": "hi", "logprobs": 3}, "logprobs"),
    (C, {"prompt": "hi", "prompt_logprobs": 3}, "prompt_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": 3}, "logprobs"),
])
def test_max_logprobs_is_enforced(server, path, body, param):
    status, answer = http("POST", server.url + path, {**body, "max_tokens": 2}, headers=AUTH)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert "--max-logprobs" in answer["error"]["message"]


def test_logprobs_at_the_cap_are_served(server):
    status, body = http("POST", server.url + C, {"prompt": "hi", "max_tokens": 2, "logprobs": 2,
                                                  "prompt_logprobs": 2}, headers=AUTH)
    assert status == 200, body
    assert all(len(top) <= 3 for top in body["choices"][0]["logprobs"]["top_logprobs"])


def test_max_logprobs_flag_is_validated(tiny_model_dir):
    assert EngineConfig.create(tiny_model_dir, max_logprobs=-1).model.max_logprobs == -1
    with pytest.raises(ValueError, match="max_logprobs"):
        EngineConfig.create(tiny_model_dir, max_logprobs=-2)


def test_choices_per_request_are_capped(server):
    half = _MAX_CHOICES // 2 + 1
    for body in ({"prompt": "hi", "n": _MAX_CHOICES + 1},
                 {"prompt": ["a", "b"], "n": half}):
        status, answer = http("POST", server.url + C, {**body, "max_tokens": 1}, headers=AUTH)
        assert status == 400 and answer["error"]["param"] == "n", answer


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Bearer {KEY}x", f"bearer {KEY}",
                                  f"Bearer {KEY[:-1]}"])
def test_api_key_is_required_on_v1(server, auth):
    headers = {} if auth is None else {"Authorization": auth}
    status, answer = http("GET", server.url + "/v1/models", headers=headers)
    assert status == 401 and answer["error"]["code"] == 401, answer


def test_api_key_accepted_and_not_needed_off_v1(server):
    assert http("GET", server.url + "/v1/models", headers=AUTH)[0] == 200
    assert http("GET", server.url + "/health")[0] == 200
    status, spec = http("GET", server.url + "/openapi.json")
    assert status == 200 and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
