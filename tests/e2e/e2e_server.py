"""Helpers of the e2e tests: the server as a user starts it (`python -m frontend serve MODEL
--port P` in a real process), HTTP without a client library, /proc and /metrics readers.

`ServerProcess` picks a free port, starts the launcher (which starts the engine core, its worker
and the API servers), waits on /health, and stops it with SIGTERM. Its log goes to a file that
a failing wait prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

# Small and fixed, so tests are fast and the KV-usage gauge moves visibly.
TINY_ENGINE_FLAGS = ["--num-gpu-blocks-override", "256", "--max-num-seqs", "64",
                     "--max-model-len", "1024"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "frontend", "serve", *args, "--host", "127.0.0.1",
               "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the launcher and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def descendants(self) -> list[int]:
        """Pids of every live process below the launcher (engine core, workers, API servers)."""
        return descendants(self.proc.pid)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            children.setdefault(info[1], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            out.append(pid)
            todo.append(pid)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped yet counts as gone)."""
    info = _stat(pid)
    return info is not None and info[0] != "Z"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/PID/stat, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[1])


def http(method: str, url: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, object]:
    """One request; returns (status, decoded JSON body or text)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """Sum of the samples of `name` in a Prometheus text page whose labels include `labels`
    (`default`, when given, if there is none)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        if default is not None:
            return default
        raise KeyError(f"no sample {name}{labels} in /metrics")
    return total


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra` (for a server with its own cache dir)."""
    return {**os.environ, **extra}


PD_PROXY_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pd_proxy.py"
_PD_WORDS = "model token server cache block request stream queue kernel memory batch".split()


def pd_prompt(seed: int, words: int = 40) -> str:
    """A deterministic prompt long enough to fill a few KV blocks (disaggregated-prefill tests)."""
    return " ".join(_PD_WORDS[(seed * 7 + i * 3) % len(_PD_WORDS)] for i in range(words))


@contextlib.contextmanager
def pd_proxy(prefill_url: str, decode_url: str) -> Iterator[str]:
    """`scripts/pd_proxy.py` in front of one prefill and one decode server; yields its URL."""
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(PD_PROXY_SCRIPT), "--port", str(port),
                              "--prefill", prefill_url, "--decode", decode_url],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _healthy(url):
        assert time.monotonic() < deadline and proxy.poll() is None, "proxy did not start"
        time.sleep(0.2)
    try:
        yield url
    finally:
        proxy.terminate()
        proxy.wait(10)


def _healthy(url: str) -> bool:
    try:
        return http("GET", url + "/health", timeout=2)[0] == 200
    except OSError:
        return False


def check_streamed_chat_matches(plain_url: str, proxy_url: str) -> str:
    """Assert a chat answer streamed through the P/D proxy equals a plain one; return the raw
    stream."""
    messages = [{"role": "user", "content": pd_prompt(9, 50)}]
    status, single = http("POST", plain_url + "/v1/chat/completions", {
        "messages": messages, "max_tokens": 10, "temperature": 0.0})
    assert status == 200, single
    status, raw = http("POST", proxy_url + "/v1/chat/completions", {
        "messages": messages, "max_tokens": 10, "temperature": 0.0, "stream": True})
    assert status == 200
    pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
              for line in raw.splitlines() if line.startswith("data: {")]
    assert "".join(pieces) == single["choices"][0]["message"]["content"]
    return raw


@contextlib.asynccontextmanager
async def embedded_server(model_dir: str) -> AsyncIterator[tuple[Any, Any]]:
    """(engine, client): an `AsyncEngine` embedded in this process with the OpenAI app on an
    aiohttp test client, /health checked 200; the engine is shut down on exit."""
    import aiohttp.test_utils

    from enginecore.config import EngineConfig
    from frontend.cli import ServerConfig
    from frontend.client import AsyncEngine
    from frontend.server import OpenAIServer

    engine = await AsyncEngine.start(EngineConfig.create(model_dir, num_gpu_blocks_override=64))
    try:
        app = OpenAIServer(engine, ServerConfig()).app
        async with aiohttp.test_utils.TestClient(aiohttp.test_utils.TestServer(app)) as client:
            assert (await client.get("/health")).status == 200
            assert engine.core is not None
            yield engine, client
    finally:
        await engine.shutdown()


async def wait_engine_dead(engine: Any, timeout: float = 5.0) -> None:
    """Give the client up to `timeout` seconds to notice its engine core died."""
    deadline = time.monotonic() + timeout
    while not engine.dead and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
