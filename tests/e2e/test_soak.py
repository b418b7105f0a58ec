"""Soak: ~20 s of mixed traffic from a few client threads (plain and n>1 completions, streamed
chat, long prompts, streams the client drops mid-way, non-streamed requests it walks away from),
then the engine must be idle again: no running or waiting request, KV-cache usage back to 0 (no
leaked block), the engine core's RSS grown by a bounded amount, and a fresh request served.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path

import pytest
from e2e_server import TINY_ENGINE_FLAGS, http, metric

pytestmark = pytest.mark.timeout(120)

_SOAK_S = 20.0
_CLIENTS = 4
_WARMUP_S = 5.0  # RSS is measured from here on (allocator pools, imports and caches settle)
_MAX_RSS_GROWTH = 64 << 20  # bytes the engine core may grow during the soak


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Traffic:
    """One client thread's request mix; `errors` collects every unexpected answer."""

    def __init__(self, port: int, seed: int, errors: list[str], counts: dict[str, int]):
        self.port, self.rng, self.errors, self.counts = port, random.Random(seed), errors, counts

    def run(self, until: float) -> None:
        kinds = [self.completion, self.chat_stream, self.long_prompt, self.dropped_stream,
                 self.walked_away]
        while time.monotonic() < until:
            kind = self.rng.choice(kinds)
            try:
                kind()
            except (OSError, HTTPException, ValueError, KeyError) as e:
                self.errors.append(f"{kind.__name__}: {e!r}")
            self.counts[kind.__name__] = self.counts.get(kind.__name__, 0) + 1

    def _conn(self) -> HTTPConnection:
        return HTTPConnection("127.0.0.1", self.port, timeout=30)

    def _post(self, path: str, body: dict) -> tuple[HTTPConnection,
                                                     HTTPResponse]:
        conn = self._conn()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def completion(self) -> None:
        n = self.rng.choice([1, 2, 4])
        conn, resp = self._post("/v1/completions", {
            "prompt": f"soak {self.rng.random()}", "n": n,
            "max_tokens": self.rng.randint(1, 24), "temperature": 1.0})
        body = json.loads(resp.read())
        conn.close()
        if resp.status != 200 or len(body["choices"]) != n:
            self.errors.append(f"completion: {resp.status} {body}")

    def chat_stream(self) -> None:
        conn, resp = self._post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "stream " * self.rng.randint(1, 40)}],
            "max_tokens": self.rng.randint(1, 24), "stream": True})
        text = resp.read().decode()
        conn.close()
        if resp.status != 200 or not text.rstrip().endswith("data: [DONE]"):
            self.errors.append(f"chat_stream: {resp.status} {text[-200:]}")

    def long_prompt(self) -> None:
        # Several chunks of prefill (max_model_len 1024); shared prefixes hit the prefix cache.
        ids = [self.rng.randrange(3, 500) for _ in range(self.rng.randint(300, 900))]
        conn, resp = self._post("/v1/completions", {"prompt": ids, "max_tokens": 4})
        body = json.loads(resp.read())
        conn.close()
        if resp.status != 200:
            self.errors.append(f"long_prompt: {resp.status} {body}")

    def dropped_stream(self) -> None:
        conn, resp = self._post("/v1/completions", {
            "prompt": "drop me", "max_tokens": 500, "ignore_eos": True, "stream": True,
            "n": self.rng.choice([1, 3])})
        for _ in range(self.rng.randint(1, 5)):
            resp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)  # gone mid-stream: the server must abort it
        conn.close()

    def walked_away(self) -> None:
        conn = self._conn()
        conn.request("POST", "/v1/completions", json.dumps({
            "prompt": "never read", "max_tokens": 500, "ignore_eos": True}),
            {"Content-Type": "application/json"})
        time.sleep(self.rng.uniform(0.05, 0.3))
        conn.close()  # before any answer: the handler is cancelled


def test_soak_mixed_traffic_leaves_engine_idle(server_factory, tiny_model_dir):
    server = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS])
    core = next(p for p in server.descendants()
                if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:3]
                == [b"-m", b"enginecore"])
    errors: list[str] = []
    counts: dict[str, int] = {}
    start = time.monotonic()
    threads = [threading.Thread(target=Traffic(server.port, seed, errors, counts).run,
                                args=(start + _SOAK_S,)) for seed in range(_CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(_WARMUP_S)
    rss_start = rss_bytes(core)
    for t in threads:
        t.join(_SOAK_S + 60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors[:5]
    assert len(counts) == 5 and sum(counts.values()) >= 40, counts

    # Aborts are asynchronous: give the engine a moment to drain them.
    deadline = time.monotonic() + 15
    while True:
        page = http("GET", server.url + "/metrics")[1]
        idle = (metric(page, "tinyllm:num_requests_running") == 0
                and metric(page, "tinyllm:num_requests_waiting") == 0
                and metric(page, "tinyllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, [line for line in page.splitlines() if line.startswith("tinyllm:")]
    assert metric(page, "tinyllm:request_success_total", finished_reason="abort") >= 1
    growth = rss_bytes(core) - rss_start
    assert growth < _MAX_RSS_GROWTH, f"engine core RSS grew {growth >> 20} MiB"
    status, body = http("POST", server.url + "/v1/completions",
                        {"prompt": "after the soak", "max_tokens": 5, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
