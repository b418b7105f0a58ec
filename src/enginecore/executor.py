"""`Executor`: the engine core's handle on its worker processes.

Starts one `python -m workers` process per rank, broadcasts `WorkerInput` to all of them through
a shared-memory ring and reads rank 0's `WorkerOutput` from a second ring. Every wait also polls
the worker processes, so a dead worker surfaces as `EngineDeadError` within a fraction of a
second instead of a hang.

Steps are split into `submit` (broadcast) and `result` (receive) so the engine core can schedule
step N+1 while the workers run step N. Workers answer steps in the order they were sent; the
rings hold several messages, so a step submitted ahead never blocks on an unread result.
"""

from __future__ import annotations

import collections
import itertools
import os
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
        self.response_name = f"tls_resp_{tag}"
        self.procs = [self._spawn(rank) for rank in range(self.world_size)]
        self.resp = self._attach_response()
        self._call_ids = itertools.count()
        self._pending_steps: collections.deque[int] = collections.deque()  # submitted, unread

    def _spawn(self, rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "workers", "--rank", str(rank),
               "--config", self.config.to_json(), "--broadcast", self.bcast.name,
               "--response", self.response_name]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def _attach_response(self) -> BroadcastQueue:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while True:
            try:
                return BroadcastQueue.attach(self.response_name, reader_rank=0)
            except (FileNotFoundError, ValueError):
                # Not created yet, or created but its header not yet written (ValueError).
                self.check_alive()
                if time.monotonic() > deadline:
                    raise EngineDeadError("workers did not start in time") from None
                time.sleep(0.01)

    # ------------------------------------------------------------ liveness

    def dead_worker(self) -> str | None:
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                return f"worker {rank} (pid {proc.pid}) exited with code {code}"
        return None

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

    def _recv(self, timeout: float | None = None):
        try:
            raw = self.resp.get(timeout=timeout,
                                should_abort=lambda: self.dead_worker() is not None)
        except PeerGoneError:
            self.check_alive()
            raise
        msg = worker_output_decoder.decode(raw)
        if isinstance(msg, WorkerError):
            raise EngineDeadError(msg.message)
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

    def profile_memory(self) -> MemoryReport:
        self._send(ProfileMemory(call_id=next(self._call_ids)))
        report = self._recv(timeout=_STARTUP_TIMEOUT_S)
        assert isinstance(report, MemoryReport)
        return report

    def init_kv_cache(self, num_blocks: int) -> None:
        self._send(InitKVCache(call_id=next(self._call_ids), num_blocks=num_blocks))
        assert isinstance(self._recv(timeout=_STARTUP_TIMEOUT_S), ControlResult)

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
                # Results of steps still in flight come first; the worker exits after replying.
                for _ in range(len(self._pending_steps) + 1):
                    self._recv(timeout=Env.PEER_TIMEOUT_S)
                self._pending_steps.clear()
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
        self.resp.close()
        _unlink_quietly(self.response_name)


def _unlink_quietly(name: str) -> None:
    """Remove a segment a crashed worker could not unlink itself."""
    path = os.path.join("/dev/shm", name.lstrip("/"))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
