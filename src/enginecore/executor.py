"""`Executor`: the engine core's handle on its worker processes.

Starts one `python -m workers` process per tensor-parallel rank, broadcasts `WorkerInput` to all
of them through a shared-memory ring and reads `WorkerOutput` from one response ring per rank:
step results from rank 0 only, control replies (memory reports, KV init, shutdown) from every
rank. Ranks find each other through torch.distributed on a free local TCP port chosen here. Every
wait also polls the worker processes, so a dead worker (any rank) surfaces as `EngineDeadError`
within a fraction of a second instead of a hang, with the error it reported if it left one.

Steps are split into `submit` (broadcast) and `result` (receive) so the engine core can schedule
step N+1 while the workers run step N. Workers answer steps in the order they were sent; the
rings hold several messages, so a step submitted ahead never blocks on an unread result.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid

from enginecore.config import EngineConfig, Env
from enginecore.protocol import (
    ControlResult,
    ExecuteStep,
    InitKVCache,
    MemoryReport,
    ProfileMemory,
    ReloadWeights,
    Shutdown,
    Sleep,
    StepResult,
    WakeUp,
    WorkerError,
    encode,
    worker_output_decoder,
)
from shm import BroadcastQueue, PeerGoneError

_STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes


class EngineDeadError(RuntimeError):
    """A worker died or failed; the engine cannot continue."""


class Executor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.world_size = config.parallel.tensor_parallel_size
        tag = uuid.uuid4().hex[:12]
        self.bcast = BroadcastQueue.create(num_readers=self.world_size)
        self.response_names = [f"tls_resp_{tag}_{rank}" for rank in range(self.world_size)]
        dist_init = f"tcp://127.0.0.1:{_free_port()}" if self.world_size > 1 else None
        self.procs = [self._spawn(rank, dist_init) for rank in range(self.world_size)]
        self.resps: list[BroadcastQueue] = []
        for name in self.response_names:
            self.resps.append(self._attach_response(name))
        self.resp = self.resps[0]
        self._call_ids = itertools.count()
        self._pending_steps: collections.deque[int] = collections.deque()  # submitted, unread

    def _spawn(self, rank: int, dist_init: str | None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "workers", "--rank", str(rank),
               "--config", self.config.to_json(), "--broadcast", self.bcast.name,
               "--response", self.response_names[rank]]
        if dist_init is not None:
            cmd += ["--dist-init", dist_init]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def _attach_response(self, name: str) -> BroadcastQueue:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while True:
            try:
                return BroadcastQueue.attach(name, reader_rank=0)
            except (FileNotFoundError, ValueError):
                # Not created yet, or created but its header not yet written (ValueError).
                self.check_alive()
                if time.monotonic() > deadline:
                    raise EngineDeadError("workers did not start in time") from None
                time.sleep(0.01)

    # ------------------------------------------------------------ liveness

    def dead_worker(self) -> str | None:
        """Why the workers are dead, or None while all live.

        When one rank dies its peers soon fail inside a collective and exit too; ranks killed by a
        signal (negative exit code) are named first since they are the likelier cause.
        """
        dead = [(rank, proc, code) for rank, proc in enumerate(self.procs)
                if (code := proc.poll()) is not None]
        if not dead:
            return None
        dead.sort(key=lambda item: (item[2] >= 0, item[0]))
        reasons = []
        for rank, proc, code in dead:
            why = f"worker {rank} (pid {proc.pid}) exited with code {code}"
            error = self._left_error(rank)
            reasons.append(why if error is None else f"{why}: {error}")
        return "; ".join(reasons)

    def _left_error(self, rank: int) -> str | None:
        # A rank other than 0 that failed a step put its WorkerError on its own ring and exited
        # (rank 0's errors arrive through `_recv`). Nothing else waits on that ring.
        if rank == 0 or rank >= len(self.resps):
            return None
        try:
            msg = worker_output_decoder.decode(self.resps[rank].get(timeout=0))
        except (TimeoutError, PeerGoneError):
            return None
        return msg.message if isinstance(msg, WorkerError) else None

    def check_alive(self) -> None:
        if (why := self.dead_worker()) is not None:
            raise EngineDeadError(why)

    # ------------------------------------------------------------ calls

    def _send(self, msg) -> None:
        try:
            self.bcast.put(encode(msg), should_abort=lambda: self.dead_worker() is not None)
        except PeerGoneError:
            self.check_alive()
            raise

    def _recv(self, timeout: float | None = None, rank: int = 0):
        try:
            raw = self.resps[rank].get(timeout=timeout,
                                       should_abort=lambda: self.dead_worker() is not None)
        except PeerGoneError:
            self.check_alive()
            raise
        msg = worker_output_decoder.decode(raw)
        if isinstance(msg, WorkerError):
            # A rank killed mid-collective makes its peers fail there: name the dead one first.
            time.sleep(0.1)  # let a dying peer's exit become visible
            why = self.dead_worker()
            raise EngineDeadError(msg.message if why is None else f"{why}; {msg.message}")
        return msg

    def submit(self, step: ExecuteStep) -> None:
        """Broadcast a step to every worker; read its result later with `result(step_id)`."""
        self._send(step)
        self._pending_steps.append(step.step_id)

    def result(self, step_id: int) -> StepResult:
        """Wait for the result of `step_id`, which must be the oldest step not yet read."""
        assert self._pending_steps and self._pending_steps[0] == step_id, (
            step_id, list(self._pending_steps))
        result = self._recv()
        self._pending_steps.popleft()
        assert isinstance(result, StepResult) and result.step_id == step_id, result
        return result

    def _recv_all(self, timeout: float | None = None) -> list:
        """One control reply from every rank, in rank order."""
        return [self._recv(timeout, rank) for rank in range(self.world_size)]

    def profile_memory(self) -> MemoryReport:
        """The memory report of the tightest rank: every rank must fit the same block count."""
        self._send(ProfileMemory(call_id=next(self._call_ids)))
        reports = self._recv_all(timeout=_STARTUP_TIMEOUT_S)
        assert all(isinstance(r, MemoryReport) for r in reports), reports
        assert len({r.bytes_per_block for r in reports}) == 1, reports
        return min(reports, key=lambda r: r.available_bytes)

    def init_kv_cache(self, num_blocks: int) -> None:
        self._send(InitKVCache(call_id=next(self._call_ids), num_blocks=num_blocks))
        replies = self._recv_all(timeout=_STARTUP_TIMEOUT_S)
        assert all(isinstance(r, ControlResult) for r in replies), replies

    def call(self, msg: Sleep | WakeUp | ReloadWeights) -> ControlResult:
        """Send a sleep-mode call to every worker and wait for rank 0's answer.

        Only between steps: results of steps in flight would come first."""
        assert not self._pending_steps, "sleep-mode calls need an idle engine"
        self._send(msg)
        result = self._recv(timeout=_STARTUP_TIMEOUT_S)
        assert isinstance(result, ControlResult), result
        return result

    def sleep(self, level: int) -> ControlResult:
        return self.call(Sleep(call_id=next(self._call_ids), level=level))

    def wake_up(self, tags: list[str]) -> ControlResult:
        return self.call(WakeUp(call_id=next(self._call_ids), tags=tags))

    def reload_weights(self, path: str) -> ControlResult:
        return self.call(ReloadWeights(call_id=next(self._call_ids), path=path))

    def shutdown(self) -> None:
        """Ask workers to exit; kill the ones that do not within the peer timeout."""
        if self.dead_worker() is None:
            try:
                self._send(Shutdown(call_id=next(self._call_ids)))
                # Results of steps still in flight come first (rank 0 only); every rank
                # replies to Shutdown, then exits.
                for _ in range(len(self._pending_steps)):
                    self._recv(timeout=Env.PEER_TIMEOUT_S)
                self._pending_steps.clear()
                self._recv_all(timeout=Env.PEER_TIMEOUT_S)
            except (EngineDeadError, PeerGoneError, TimeoutError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=Env.PEER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.bcast.close()
        self.bcast.unlink()
        for resp, name in zip(self.resps, self.response_names, strict=False):
            resp.close()
            _unlink_quietly(name)


def _free_port() -> int:
    """A TCP port free on this host now (the OS picks it); the ranks rendezvous on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unlink_quietly(name: str) -> None:
    """Remove a segment a crashed worker could not unlink itself."""
    path = os.path.join("/dev/shm", name.lstrip("/"))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
