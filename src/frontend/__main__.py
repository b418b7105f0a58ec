"""`python -m frontend serve [MODEL] [flags]`: the launcher of the OpenAI-compatible server.

    launcher (this process: binds the port once, supervises, forwards SIGINT/SIGTERM)
      |-- engine core(s)   python -m enginecore (num_clients=N), one per local DP rank
      |                      -- workers: python -m workers
      |-- API server 0     python -m frontend api-server --client-index 0  \\  one listening
      |-- ...                                                              >  socket, inherited
      `-- API server N-1   python -m frontend api-server --client-index N-1 /  (pass_fds)

The launcher builds `EngineConfig` and `ServerConfig` from the flags (`frontend/cli.py`), binds
the socket, starts the engine cores and `--api-server-count` API servers, then only supervises: a
signal is forwarded to the children, and the death of any child shuts the rest down. Each API
server reads its `ApiServerSpec` (JSON) from stdin, connects to every core as client
`client_index` (a core routes each request's outputs back by that index) and serves the shared
socket with aiohttp on uvloop. Every child watches `os.getppid()`, so none outlives a launcher
killed with SIGKILL. The launcher also creates the Prometheus multiprocess directory the API
servers share (see `frontend/metrics.py`).

Multi-node data parallel (docs/parallelism.md): a head node whose `--data-parallel-size-local` is
smaller than `--data-parallel-size` first waits, on `--data-parallel-rpc-port`, for the engine
cores of the other ranks to register (`frontend/dp_registry.py`), then starts its API servers
with every core's addresses. A `--headless` node runs only engine cores, which register with the
head themselves, and supervises them.

Without MODEL the demo checkpoint is built once into `Env.CACHE_DIR` by `python -m workers.demo`
(a subprocess: the frontend never imports torch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

from enginecore.config import EngineConfig, Env
from enginecore.protocol import DPRegister
from frontend.cli import ServerConfig, parse_serve_args
from frontend.dp_registry import DPRegistry
from frontend.engine_link import EngineEndpoint
from frontend.launch import CoreHandle, start_headless_cores, start_local_cores

logger = logging.getLogger("frontend")

DEMO_NAME = "tinyllm-demo"  # the served model name when no MODEL is given
_STOP_TIMEOUT_S = 10.0  # per stage of the shutdown, before SIGKILL
_POLL_S = 0.1  # launcher: how often it checks its children
_PARENT_POLL_S = 0.5  # API server: how often it checks that the launcher is alive
_USAGE = "usage: python -m frontend serve [MODEL] [flags]   (see: python -m frontend serve -h)"


class ApiServerSpec(msgspec.Struct, kw_only=True):
    """What one API-server process needs; the launcher writes it as JSON to the child's stdin."""

    engine: EngineConfig
    server: ServerConfig
    client_index: int
    fd: int  # the inherited listening socket
    engines: list[EngineEndpoint]  # every engine core (DP rank): its input, our output address
    metrics_dir: str | None = None  # prometheus-client multiprocess directory


# ---------------------------------------------------------------------- launcher


def serve(argv: list[str]) -> int:
    """Run the server until SIGINT/SIGTERM or until a child dies; return the exit code."""
    model, engine_kwargs, server = parse_serve_args(argv)
    try:
        if model is None:
            model = _demo_model()
            if not server.served_model_name:
                server = msgspec.structs.replace(server, served_model_name=[DEMO_NAME])
        config = EngineConfig.create(model, **engine_kwargs)
        p = config.parallel
        if server.headless and p.local_dp_size == 0:
            raise ValueError("--headless needs data_parallel_size_local >= 1")
        sock = None if server.headless else socket.create_server(
            (server.host, server.port), backlog=1024,
            family=socket.AF_INET6 if ":" in server.host else socket.AF_INET)
        local = range(p.data_parallel_start_rank, p.data_parallel_start_rank + p.local_dp_size)
        remote = [r for r in range(p.data_parallel_size) if r not in local]
        registry = None if server.headless or not remote else \
            DPRegistry(config, server.api_server_count, remote)
    except (OSError, ValueError, TypeError, subprocess.CalledProcessError,
            zmq.ZMQError) as e:
        logger.error("cannot start: %s", e)
        return 2
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    if server.headless:
        return _serve_headless(config, received)
    assert sock is not None
    metrics_dir = tempfile.mkdtemp(prefix="tls-metrics-")
    # prometheus-client reads this in the API servers (children inherit it) when it is imported.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    cores = start_local_cores(config, num_clients=server.api_server_count)
    servers: list[subprocess.Popen] = []
    try:
        registered: dict[int, DPRegister] = {}
        if registry is not None:
            logger.info("waiting for DP ranks %s to register at %s", remote, registry.address)
            got = registry.wait(lambda: bool(received) or any(not c.alive() for c in cores))
            registry.close()
            if got is None:
                return 0 if received else 1
            registered = got
        for i in range(server.api_server_count):
            servers.append(_start_api_server(ApiServerSpec(
                engine=config, server=server, client_index=i, fd=sock.fileno(),
                engines=_endpoints(cores, registered, i), metrics_dir=metrics_dir)))
        port = sock.getsockname()[1]
        sock.close()  # the API servers hold their own copies
        logger.info("starting %s as %s on http://%s:%d with %d API server(s), %d DP rank(s)",
                    model, server.served_model_name or [model], server.host, port,
                    server.api_server_count, p.data_parallel_size)
        code = _supervise(cores, servers, received)
    finally:
        _stop_children(cores, servers, received[0] if received else signal.SIGTERM)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _endpoints(cores: list[CoreHandle], registered: dict[int, DPRegister],
               client_index: int) -> list[EngineEndpoint]:
    """Client `client_index`'s addresses of every engine core, in DP-rank order."""
    out = [EngineEndpoint(dp_rank=c.dp_rank, input_addr=c.input_addr,
                          output_addr=c.output_addrs[client_index]) for c in cores]
    out += [EngineEndpoint(dp_rank=rank, input_addr=reg.input_addr,
                           output_addr=reg.output_addrs[client_index], local=False)
            for rank, reg in registered.items()]
    return sorted(out, key=lambda e: e.dp_rank)


def _serve_headless(config: EngineConfig, received: list[int]) -> int:
    """A node without API servers: its engine cores register with the head and serve it."""
    p = config.parallel
    head = f"tcp://{p.data_parallel_address}:{p.data_parallel_rpc_port}"
    cores = start_headless_cores(config, head)
    logger.info("headless: DP ranks %s registering with the head at %s",
                [c.dp_rank for c in cores], head)
    try:
        return _supervise(cores, [], received)
    finally:
        _stop_children(cores, [], received[0] if received else signal.SIGTERM)


def _demo_model() -> str:
    out = Path(Env.CACHE_DIR) / "demo"
    logger.info("no MODEL given: serving the demo checkpoint in %s (built on first use)", out)
    subprocess.run([sys.executable, "-m", "workers.demo", "--out", str(out)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return str(out)


def _start_api_server(spec: ApiServerSpec) -> subprocess.Popen:
    # The spec travels on stdin (it holds the API key); --client-index is only there for `ps`.
    cmd = [sys.executable, "-m", "frontend", "api-server", "--client-index",
           str(spec.client_index)]
    # Own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(spec.fd,), process_group=0)
    assert proc.stdin is not None
    proc.stdin.write(msgspec.json.encode(spec))
    proc.stdin.close()
    return proc


def _supervise(cores: list[CoreHandle], servers: list[subprocess.Popen],
               received: list[int]) -> int:
    """Wait for a signal (exit code 0) or a dead child (exit code 1)."""
    while not received:
        for core in cores:
            if not core.alive():
                logger.error("engine core (DP rank %d) exited with code %s; shutting down",
                             core.dp_rank, core.proc.poll())
                return 1
        for i, proc in enumerate(servers):
            if proc.poll() is not None:
                logger.error("API server %d exited with code %s; shutting down", i,
                             proc.returncode)
                return 1
        time.sleep(_POLL_S)
    logger.info("received %s; shutting down", signal.Signals(received[0]).name)
    return 0


def _stop_children(cores: list[CoreHandle], servers: list[subprocess.Popen],
                   signum: int) -> None:
    """API servers first (they abort their requests), then the engine cores and their workers."""
    for proc in servers:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in servers:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for core in cores:  # SIGTERM to all first, so they stop in parallel
        if core.alive():
            core.proc.send_signal(signal.SIGTERM)
    for core in cores:
        core.stop(_STOP_TIMEOUT_S)


# ---------------------------------------------------------------------- API server process


def api_server() -> int:
    """Entry of one API-server process: read the spec from stdin, serve until told to stop."""
    import uvloop

    spec = msgspec.json.decode(sys.stdin.buffer.read(), type=ApiServerSpec)
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s api-server{spec.client_index} %(message)s"))
    uvloop.run(_run_api_server(spec))
    return 0


async def _run_api_server(spec: ApiServerSpec) -> None:
    # Imported here: the launcher process never needs aiohttp or the client.
    from aiohttp import web

    from frontend.client import AsyncEngine
    from frontend.server import OpenAIServer

    parent = os.getppid()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != parent

    connect = asyncio.ensure_future(AsyncEngine.connect(
        spec.engine, spec.engines, spec.client_index))
    while not connect.done():
        await asyncio.wait({connect}, timeout=_PARENT_POLL_S)
        if should_stop():
            connect.cancel()
            return
    engine = connect.result()
    try:
        await engine.get_stats()  # the scheduler's KV capacity bounds prompt lengths from the start
        server = OpenAIServer(engine, spec.server, spec.metrics_dir)
        # handler_cancellation: a disconnected client cancels its handler, which aborts its
        # engine requests; shutdown_timeout bounds how long in-flight requests may finish.
        runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=1.0,
                               keepalive_timeout=spec.server.timeout_keep_alive)
        await runner.setup()
        await web.SockSite(runner, socket.socket(fileno=spec.fd)).start()
        logger.info("ready")
        while not should_stop():
            try:
                await asyncio.wait_for(stop.wait(), _PARENT_POLL_S)
            except TimeoutError:
                pass
        await runner.cleanup()
    finally:
        await engine.shutdown()


def main() -> None:
    logging.basicConfig(level=Env.LOG_LEVEL, format="%(asctime)s frontend %(message)s")
    command = sys.argv[1:2]
    if command == ["serve"]:
        sys.exit(serve(sys.argv[2:]))
    if command == ["api-server"]:
        sys.exit(api_server())
    print(_USAGE, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
