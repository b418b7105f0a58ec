"""Two API servers on one port: concurrent streams, /metrics across processes, disconnects, and
the serving benchmark script against the same server."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from e2e_server import TINY_ENGINE_FLAGS, http, metric

NUM_STREAMS = 64
WORDS = ("model token server cache block request stream queue kernel memory batch engine prompt "
         "answer question hello water number sound people world").split()
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"


@pytest.fixture(scope="module")
def server(server_factory, tiny_model_dir):
    # Request logs show which API server took each request.
    return server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--api-server-count", "2",
                           "--enable-log-requests", "--max-log-len", "0"])


def scrape(url: str) -> str:
    status, text = http("GET", url + "/metrics")
    assert status == 200
    return text


async def _complete(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[str, str]:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0.0}
    async with session.post(url + "/v1/completions", json=body) as resp:
        choice = (await resp.json())["choices"][0]
        return choice["text"], choice["finish_reason"]


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[str, str]:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "stream": True}
    text, finish = [], None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_64_concurrent_streams_match_non_streamed_greedy(server):
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(NUM_STREAMS)]
    before = metric(scrape(server.url), "tinyllm:request_success_total", default=0.0)

    async def run() -> tuple[list, list]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            expected = await asyncio.gather(*(_complete(session, server.url, p) for p in prompts))
            streamed = await asyncio.gather(*(_stream(session, server.url, p) for p in prompts))
            return expected, streamed

    expected, streamed = asyncio.run(run())
    assert streamed == expected
    assert len({text for text, _ in expected}) > NUM_STREAMS // 2  # distinct prompts, answers
    log = server.log()
    assert "api-server0 request" in log and "api-server1 request" in log  # both took some
    # Every scrape, whichever API server answers it, sees the requests of both.
    for _ in range(6):
        page = scrape(server.url)
        assert metric(page, "tinyllm:api_servers") == 2
        assert metric(page, "tinyllm:request_success_total") - before == 2 * NUM_STREAMS
        assert metric(page, "tinyllm:time_to_first_token_seconds_count") >= 2 * NUM_STREAMS
        assert metric(page, "tinyllm:num_requests_running") == 0


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    finished = metric(scrape(server.url), "tinyllm:request_success_total", default=0.0)

    async def run() -> tuple[float, float]:
        body = {"prompt": "hello world " * 8, "max_tokens": 900, "ignore_eos": True,
                "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/completions", json=body) as resp:
                chunks = 0
                async for line in resp.content:
                    chunks += line.startswith(b"data: {")
                    if chunks == 3:
                        break
                page = await asyncio.to_thread(scrape, server.url)
                return (metric(page, "tinyllm:kv_cache_usage_perc"),
                        metric(page, "tinyllm:num_requests_running"))
            # Leaving the `async with` closes the connection mid-stream.

    usage, running = asyncio.run(run())
    assert usage > 0 and running == 1
    deadline = time.monotonic() + 10
    while True:
        page = scrape(server.url)
        if metric(page, "tinyllm:kv_cache_usage_perc") == 0:
            break
        assert time.monotonic() < deadline, "KV blocks still in use after the disconnect"
        time.sleep(0.05)
    assert metric(page, "tinyllm:num_requests_running") == 0
    # Counted as aborted: it did not run to its 900 tokens.
    assert metric(page, "tinyllm:request_success_total", finished_reason="abort") == 1
    assert metric(page, "tinyllm:request_success_total") - finished == 1


def test_bench_serving_script(server, tmp_path):
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--base-url", server.url, "--num-prompts", "12",
         "--max-concurrency", "4", "--request-rate", "50", "--input-len", "24",
         "--output-len", "6", "--range-ratio", "0.5", "--result-file", str(result)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout
    summary = json.loads(result.read_text())
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert 12 * 3 <= summary["total_output_tokens"] <= 12 * 9  # ignore_eos: exact lengths
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < summary[f"p50_{name}_ms"] <= summary[f"p99_{name}_ms"]
    assert summary["output_throughput"] > 0 and summary["request_throughput"] > 0
