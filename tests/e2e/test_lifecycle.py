"""Process lifecycle: the no-MODEL demo start, SIGTERM and SIGKILL of the launcher, and a dead
engine seen through /health."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from e2e_server import TINY_ENGINE_FLAGS, alive, child_env, embedded_server, http, wait_engine_dead


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait for every pid to exit; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_demo_model_serves_and_sigterm_leaves_no_orphans(server_factory, tmp_path):
    # A fresh cache dir: the launcher builds the demo checkpoint (python -m workers.demo) first.
    server = server_factory(["--num-gpu-blocks-override", "64", "--max-model-len", "512"],
                            env=child_env(TLS_CACHE_DIR=str(tmp_path / "cache")))
    assert (tmp_path / "cache" / "demo" / "config.json").is_file()
    status, models = http("GET", server.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tinyllm-demo"]
    status, body = http("POST", server.url + "/v1/chat/completions", {
        "model": "tinyllm-demo", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    children = server.descendants()
    assert len(children) >= 3  # engine core, its worker, one API server
    assert server.stop(signal.SIGTERM) == 0
    assert wait_gone(children) == []


def test_launcher_killed_children_exit(server_factory, tiny_model_dir):
    server = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--api-server-count", "2"])
    children = server.descendants()
    assert len(children) >= 4  # engine core, worker, two API servers
    os.kill(server.proc.pid, signal.SIGKILL)  # no chance to forward anything
    server.proc.wait()
    assert wait_gone(children) == []


def test_health_503_once_engine_is_dead(tiny_model_dir):
    async def run() -> None:
        async with embedded_server(tiny_model_dir) as (engine, c):
            engine.core.proc.kill()
            await wait_engine_dead(engine)
            resp = await c.get("/health")
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == 503
            resp = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert resp.status == 503
            assert (await c.get("/metrics")).status == 200  # still scrapeable

    asyncio.run(run())
