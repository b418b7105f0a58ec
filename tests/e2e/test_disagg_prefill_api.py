"""Disaggregated prefill through the HTTP servers: a producer (prefill) server, a consumer
(decode) server sharing a shared-memory KV store, and `scripts/pd_proxy.py` in front. Answers
through the proxy must equal a single instance's, and the consumer must have loaded the prompt
blocks (reported as cached tokens although it never saw the prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_server import TINY_ENGINE_FLAGS, check_streamed_chat_matches, http, pd_prompt, pd_proxy

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pd(server_factory, tiny_model_dir, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("kv-store"))

    def kv(role: str) -> list[str]:
        return ["--kv-transfer-config", json.dumps({
            "kv_connector": "SharedMemoryConnector", "kv_role": role,
            "kv_connector_extra_config": {"shm_path": store}})]

    producer = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, *kv("kv_producer")])
    consumer = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, *kv("kv_consumer")])
    with pd_proxy(producer.url, consumer.url) as url:
        yield producer, consumer, url, store


def _complete(url: str, text: str, **extra) -> dict:
    status, body = http("POST", url + "/v1/completions", {
        "prompt": text, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **extra})
    assert status == 200, body
    return body


def test_completions_through_proxy_match_one_instance(pd):
    producer, consumer, url, store = pd
    for seed in range(3):
        text = pd_prompt(seed)
        single = _complete(producer.url, text + " single")  # a plain answer, nothing shared
        through = _complete(url, text + " single")
        assert through["choices"][0]["text"] == single["choices"][0]["text"]
        cached = through["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= 16, through["usage"]  # the consumer loaded the prompt's full blocks
    assert any(Path(store).rglob("*.r0"))


def test_streamed_chat_through_proxy_matches_one_instance(pd):
    producer, consumer, url, store = pd
    raw = check_streamed_chat_matches(producer.url, url)
    assert raw.rstrip().endswith("data: [DONE]")


def test_prefill_errors_come_back_as_is(pd):
    _, _, url, _ = pd
    status, body = http("POST", url + "/v1/completions", {"prompt": "hi", "temperature": -1})
    assert status == 400 and "temperature" in json.dumps(body)
