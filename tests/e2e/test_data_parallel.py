"""Data parallel end to end: two engine cores behind the API server, on one node and as two
"nodes" on 127.0.0.1 (a head with rank 0 and a `--headless` node with rank 1).

Both ranks must serve requests (per-rank /metrics, label engine), greedy outputs must equal a
DP=1 server's, control ops reach every rank, and losing the headless node must turn /health into
503 and end in-flight requests instead of hanging them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http import client as httpclient

import pytest
from e2e_server import (
    TINY_ENGINE_FLAGS,
    ServerProcess,
    alive,
    child_env,
    descendants,
    free_port,
    http,
    metric,
)

pytestmark = pytest.mark.timeout(240)

PROMPTS = [f"the {w} of the model number {i}" for i, w in
           enumerate("cache block request stream queue kernel memory batch".split())]
# A silent remote core counts as dead after this long (the default is 5 s).
PEER_TIMEOUT_S = "3"


def complete_all(url: str, prompts: list[str], max_tokens: int = 10) -> list[str]:
    """Greedy completions, sent concurrently so the load balancer spreads them."""
    out: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        status, body = http("POST", url + "/v1/completions", {
            "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0.0})
        assert status == 200, body
        out[i] = body["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(text is not None for text in out)
    return out  # type: ignore[return-value]


def per_rank(url: str, name: str) -> dict[str, float]:
    status, page = http("GET", url + "/metrics")
    assert status == 200
    return {rank: metric(page, name, engine=rank) for rank in ("0", "1")}


@pytest.fixture(scope="module")
def reference(server_factory, tiny_model_dir) -> list[str]:
    """What a DP=1 server answers; stopped right away to free the CPU."""
    server = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS])
    try:
        return complete_all(server.url, PROMPTS)
    finally:
        server.stop()


def test_dp2_on_one_node_balances_and_matches_dp1(server_factory, tiny_model_dir, reference):
    # Two API servers too: each is a client of both cores.
    server = server_factory([tiny_model_dir, *TINY_ENGINE_FLAGS, "--data-parallel-size", "2",
                             "--api-server-count", "2"])
    assert complete_all(server.url, PROMPTS) == reference
    queries = per_rank(server.url, "tinyllm:prefix_cache_queries_total")
    assert queries["0"] > 0 and queries["1"] > 0, queries  # both ranks took requests
    # The same prompts again: wherever they land, the answers stay the same.
    assert complete_all(server.url, PROMPTS[::-1]) == reference[::-1]
    status, body = http("POST", server.url + "/reset_prefix_cache")
    assert status == 200 and body == {"success": True}
    # Kill one rank's engine core: the launcher shuts the whole server down.
    cores = [p for p in server.descendants()
             if open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[1:3] == [b"-m",
                                                                          b"enginecore"]]
    assert len(cores) == 2
    os.kill(cores[1], signal.SIGKILL)
    assert server.proc.wait(timeout=30) == 1


class HeadlessNode:
    """`python -m frontend serve MODEL --headless ...`: engine cores only, no HTTP port."""

    def __init__(self, args: list[str], log_path, env: dict[str, str]):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen([sys.executable, "-m", "frontend", "serve", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def kill(self) -> list[int]:
        """SIGKILL the node's every process at once (the node is lost); return their pids."""
        pids = [self.proc.pid, *descendants(self.proc.pid)] if self.proc.poll() is None else []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._log.close()
        return pids


@pytest.fixture(scope="module")
def two_nodes(server_factory, tiny_model_dir, tmp_path_factory):
    port = free_port()
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
          "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port)]
    env = child_env(TLS_PEER_TIMEOUT_S=PEER_TIMEOUT_S)
    log = tmp_path_factory.mktemp("headless") / "headless.log"
    # 2048-token streams (`_stream`) outlast the peer timeout even on a fast, idle machine.
    flags = [*TINY_ENGINE_FLAGS, "--max-model-len", "2048"]
    node = HeadlessNode([tiny_model_dir, *flags, *dp, "--headless",
                         "--data-parallel-start-rank", "1"], log, env)
    try:
        head = server_factory([tiny_model_dir, *flags, *dp], env=env)
    except BaseException:
        node.kill()
        print(log.read_text(errors="replace"))
        raise
    yield head, node
    if node.proc.poll() is None:
        node.kill()


def test_two_nodes_serve_both_ranks_and_match_dp1(two_nodes, reference):
    head, node = two_nodes
    assert complete_all(head.url, PROMPTS) == reference
    queries = per_rank(head.url, "tinyllm:prefix_cache_queries_total")
    assert queries["0"] > 0 and queries["1"] > 0, queries
    assert "DP rank 1 registered" in head.log()


def _stream(port: int, ended: list[str], started: threading.Barrier) -> None:
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=60)
    outcome = "ok"
    try:
        conn.request("POST", "/v1/completions", json.dumps({
            "prompt": "lost node", "max_tokens": 1900, "ignore_eos": True, "stream": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.readline()
        started.wait()
        body = resp.read().decode(errors="replace")
        if '"error"' in body or "[DONE]" not in body:
            outcome = "error"
    except (OSError, httpclient.HTTPException):
        outcome = "dropped"
    except threading.BrokenBarrierError:
        outcome = "never started"
    finally:
        conn.close()
    ended.append(outcome)


def test_losing_the_headless_node_is_reported_not_hung(two_nodes):
    head, node = two_nodes
    # Two long streams: the balancer puts one on each rank.
    ended: list[str] = []
    started = threading.Barrier(3, timeout=60)
    threads = [threading.Thread(target=_stream, args=(head.port, ended, started), daemon=True)
               for _ in range(2)]
    for t in threads:
        t.start()
    started.wait()
    running = per_rank(head.url, "tinyllm:num_requests_running")
    assert running == {"0": 1.0, "1": 1.0}, running
    pids = node.kill()
    killed_at = time.monotonic()
    for t in threads:
        t.join(float(PEER_TIMEOUT_S) + 15)
    assert len(ended) == 2, "a request hung after the node was lost"
    assert all(e in ("error", "dropped") for e in ended), ended
    assert time.monotonic() - killed_at < float(PEER_TIMEOUT_S) + 15
    status, body = http("GET", head.url + "/health")
    assert status == 503 and "stopped responding" in json.dumps(body), body
    status, _ = http("POST", head.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 503
    assert not any(alive(p) for p in pids)


def test_losing_the_head_stops_the_headless_node(tiny_model_dir, tmp_path):
    """The other direction: a headless node whose head is gone shuts itself down."""
    port = free_port()
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
          "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port)]
    env = child_env(TLS_PEER_TIMEOUT_S=PEER_TIMEOUT_S)
    node = HeadlessNode([tiny_model_dir, *TINY_ENGINE_FLAGS, *dp, "--headless",
                         "--data-parallel-start-rank", "1"], tmp_path / "headless.log", env)
    head = ServerProcess([tiny_model_dir, *TINY_ENGINE_FLAGS, *dp], tmp_path, env)
    try:
        head.wait_healthy()
        node_pids = [node.proc.pid, *descendants(node.proc.pid)]
        for pid in [head.proc.pid, *head.descendants()]:
            os.kill(pid, signal.SIGKILL)
        head.proc.wait()
        assert node.proc.wait(timeout=float(PEER_TIMEOUT_S) + 20) == 1
        deadline = time.monotonic() + 20
        while any(alive(p) for p in node_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in node_pids)
        assert "no word from the head" in (tmp_path / "headless.log").read_text()
    finally:
        head.stop()
        node.kill()  # (only closes its log if it is gone already)
