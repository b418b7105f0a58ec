"""Disaggregated prefill with the NIXL connector through the HTTP servers: a prefill server P
and a decode server D (NixlConnector over UCX on 127.0.0.1, each its own side-channel port) and
`scripts/pd_proxy.py` in front. Answers through the proxy must equal a plain request's, bitwise
in their logprobs (every server runs batch-invariant, see tests/test_nixl_connector.py); D must
report the prompt's blocks as cached; P's KV usage must return to zero once D has read them."""

from __future__ import annotations

import json
import time

import pytest
from e2e_server import (
    TINY_ENGINE_FLAGS,
    check_streamed_chat_matches,
    child_env,
    free_port,
    http,
    metric,
    pd_prompt,
    pd_proxy,
)

from workers.nixl_worker import import_nixl

try:
    import_nixl()
except ImportError:
    pytest.skip("the nixl package is not installed", allow_module_level=True)
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pd(server_factory, tiny_model_dir):
    def kv() -> list[str]:
        return ["--kv-transfer-config", json.dumps({
            "kv_connector": "NixlConnector", "kv_role": "kv_both",
            "side_channel_port": free_port()})]

    env = child_env(TLS_BATCH_INVARIANT="1")
    producer = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, *kv()], env)
    consumer = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, *kv()], env)
    with pd_proxy(producer.url, consumer.url) as url:
        yield producer, consumer, url


def _complete(url: str, text: str, **extra) -> dict:
    status, body = http("POST", url + "/v1/completions", {
        "prompt": text, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
        "logprobs": 2, **extra})
    assert status == 200, body
    return body


def _kv_usage(server) -> float:
    status, text = http("GET", server.url + "/metrics")
    assert status == 200
    return metric(text, "tinyllm:kv_cache_usage_perc")


def _wait_usage_zero(server, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (usage := _kv_usage(server)) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    return usage


def test_completions_through_proxy_match_a_plain_request(pd):
    producer, consumer, url = pd
    for seed in range(2):
        text = pd_prompt(seed)
        single = _complete(producer.url, text)  # a plain request: nothing held, nothing read
        assert single["kv_transfer_params"] is None
        through = _complete(url, text)
        assert through["choices"][0]["text"] == single["choices"][0]["text"]
        assert through["choices"][0]["logprobs"] == single["choices"][0]["logprobs"]
        cached = through["usage"]["prompt_tokens_details"]["cached_tokens"]
        num_prompt = through["usage"]["prompt_tokens"]
        assert cached == (num_prompt - 1) // 16 * 16 > 0, through["usage"]
    assert _wait_usage_zero(producer) == 0  # D's notifications freed P's held blocks


def test_prefill_answer_carries_where_the_blocks_are(pd):
    producer, _, _ = pd
    body = _complete(producer.url, pd_prompt(5), max_tokens=1,
                     kv_transfer_params={"do_remote_decode": True})
    params = body["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["tp_size"] == 1
    assert len(params["remote_block_ids"]) == body["usage"]["prompt_tokens"] // 16
    assert params["remote_host"] == "127.0.0.1" and params["remote_request_id"] == body["id"]
    assert _kv_usage(producer) > 0  # held until a D reads them (or the timeout)


def test_streamed_chat_through_proxy_matches_a_plain_request(pd):
    producer, _, url = pd
    check_streamed_chat_matches(producer.url, url)


@pytest.mark.parametrize("params, field", [
    ({"do_remote_prefill": "yes"}, "do_remote_prefill"),
    ({"do_remote_prefill": True}, "remote_engine_id"),
    ({"do_remote_prefill": True, "remote_engine_id": "p", "remote_block_ids": [1],
      "remote_host": "127.0.0.1", "remote_port": 5600, "remote_request_id": "x",
      "tp_size": 2}, "tp_size"),
])
def test_bad_kv_transfer_params_are_a_400_naming_the_field(pd, params, field):
    _, consumer, _ = pd
    status, body = http("POST", consumer.url + "/v1/completions", {
        "prompt": "hi", "max_tokens": 2, "kv_transfer_params": params})
    assert status == 400 and field in json.dumps(body), body
    status, body = http("POST", consumer.url + "/v1/completions", {
        "prompt": ["a", "b"], "max_tokens": 2, "kv_transfer_params": {}})
    assert status == 400 and "kv_transfer_params" in json.dumps(body), body
