"""Faults under load: SIGKILL a worker, the engine core, or one API server while requests are in
flight. Every in-flight request must end promptly (an error status or a dropped connection, never
a hang), the launcher must shut the rest down (exit code 1), and nothing may be left behind: no
process below the launcher, no /dev/shm segment the processes had mapped. Embedded (no
launcher), a dead worker turns /health into 503 and later requests into 503s.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from e2e_server import TINY_ENGINE_FLAGS, alive, descendants, embedded_server, wait_engine_dead

pytestmark = pytest.mark.timeout(120)

_PROMPT_LOAD = 6  # concurrent streaming requests in flight when the fault hits
_PROMPT_DEADLINE_S = 10.0  # every in-flight request must have ended this soon after the kill


def shm_mapped(pids: list[int]) -> set[str]:
    """The /dev/shm segments the processes map (by name; tests running alongside in other
    processes cannot disturb the check, unlike a before/after listing of /dev/shm)."""
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            if (i := line.find("/dev/shm/")) >= 0:
                names.add(line[i + len("/dev/shm/"):].removesuffix(" (deleted)"))
    return names


def shm_left(names: set[str]) -> set[str]:
    return {n for n in names if os.path.exists(os.path.join("/dev/shm", n))}


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def find(pids: list[int], module: str) -> list[int]:
    """The pids among `pids` running `python -m <module> ...`."""
    return [p for p in pids if cmdline(p)[1:3] == ["-m", module]]


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Load:
    """`_PROMPT_LOAD` long streaming completions in threads; records how and when each ended."""

    def __init__(self, port: int):
        self.port = port
        self.started = threading.Barrier(_PROMPT_LOAD + 1, timeout=60)
        self.ended: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._one, daemon=True)
                        for _ in range(_PROMPT_LOAD)]
        for t in self.threads:
            t.start()
        self.started.wait()  # every request has streamed its first chunk

    def _one(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        outcome = "ok"
        try:
            conn.request("POST", "/v1/completions", json.dumps({
                "prompt": "fault", "max_tokens": 900, "ignore_eos": True, "stream": True}),
                {"Content-Type": "application/json"})
            resp = conn.getresponse()
            first = resp.readline()
            self.started.wait()
            if resp.status != 200 or not first:
                outcome = f"status {resp.status}"
            body = resp.read().decode(errors="replace")
            if '"error"' in body or "[DONE]" not in body:
                outcome = "error in stream" if '"error"' in body else "stream cut"
        except (OSError, http.client.HTTPException) as e:
            outcome = type(e).__name__
        except threading.BrokenBarrierError:
            outcome = "never started"
        finally:
            conn.close()
        self.ended.append((time.monotonic(), outcome))

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def _kill_under_load(server_factory, model: str, victim: str, api_servers: int = 1) -> None:
    server = server_factory([model, *TINY_ENGINE_FLAGS, "--api-server-count", str(api_servers)])
    children = server.descendants()
    load = Load(server.port)
    targets = {"worker": find(children, "workers"), "core": find(children, "enginecore"),
               "api": [p for p in children if cmdline(p)[1:4] == ["-m", "frontend",
                                                                   "api-server"]]}[victim]
    assert targets, (victim, [cmdline(p) for p in children])
    segments = shm_mapped(children)
    assert segments  # the engine core and the worker share two rings
    killed_at = time.monotonic()
    os.kill(targets[0], signal.SIGKILL)
    load.join(_PROMPT_DEADLINE_S + 5)
    assert len(load.ended) == _PROMPT_LOAD, "a request hung after the fault"
    assert all(t - killed_at < _PROMPT_DEADLINE_S for t, _ in load.ended), load.ended
    assert all(outcome != "ok" for _, outcome in load.ended), load.ended  # none "finished"
    assert server.proc.wait(timeout=30) == 1  # the launcher noticed and shut everything down
    assert wait_gone(children) == []
    assert descendants(server.proc.pid) == []
    assert shm_left(segments) == set()


def test_worker_killed_under_load(server_factory, tiny_model_dir):
    _kill_under_load(server_factory, tiny_model_dir, "worker")


def test_engine_core_killed_under_load(server_factory, tiny_model_dir):
    _kill_under_load(server_factory, tiny_model_dir, "core")


def test_api_server_killed_under_load(server_factory, tiny_model_dir):
    _kill_under_load(server_factory, tiny_model_dir, "api", api_servers=2)


def test_embedded_worker_killed_health_503(tiny_model_dir):
    segments: set[str] = set()

    async def run() -> None:
        async with embedded_server(tiny_model_dir) as (engine, c):
            workers = find(descendants(engine.core.proc.pid), "workers")
            assert len(workers) == 1
            segments.update(shm_mapped([engine.core.proc.pid, *workers]))
            pending = asyncio.ensure_future(c.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 400, "ignore_eos": True}))
            await asyncio.sleep(0.5)
            os.kill(workers[0], signal.SIGKILL)
            resp = await asyncio.wait_for(pending, _PROMPT_DEADLINE_S)
            assert resp.status == 503, await resp.text()
            await wait_engine_dead(engine)
            assert (await c.get("/health")).status == 503
            resp = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert resp.status == 503

    asyncio.run(run())
    assert segments and shm_left(segments) == set()
