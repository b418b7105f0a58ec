"""`EngineCore`: the busy loop that owns the scheduler and drives the workers.

One process per data-parallel rank. Two I/O threads keep socket work (msgpack decode/encode,
ZMQ) off the loop:

    input thread:  ZMQ PULL (bound) --decode--> input_queue
    busy loop:     input_queue -> Scheduler.add/abort -> schedule() -> Executor.submit()
                   -> Executor.result() -> Scheduler.update() -> output_queue
    output thread: output_queue --encode--> one ZMQ PUSH per client (routed by client_index)

With `async_scheduling` the loop keeps one step in flight ahead, so the core's CPU work overlaps
the workers' GPU work instead of alternating with it:

    core:    | sched N+1 | send N+1 | wait, recv N | update N, emit | sched N+2 | send N+2 | ...
    workers: |<--------------- step N ----------->|<------------------ step N+1 ------------...

Without it each step is received and applied before the next is scheduled.

The loop blocks on the input queue only when no request is unfinished and no step is in flight,
so an idle engine costs no CPU and a busy one never waits on a socket.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import zmq

from enginecore.config import EngineConfig, Env
from enginecore.executor import EngineDeadError, Executor
from enginecore.protocol import (
    SLEEP_TAGS,
    Abort,
    AddRequest,
    Control,
    ControlResult,
    CoreReady,
    EngineOutputs,
    ExecuteStep,
    SchedulerStats,
    TokenDelta,
    core_input_decoder,
    encode,
)
from enginecore.scheduler import Scheduler

logger = logging.getLogger("enginecore")

_IDLE_POLL_S = 0.5  # how often an idle loop checks its parent and workers
# An otherwise idle NixlConnector producer holding blocks: how often it steps (empty steps) so
# the workers report consumers' notifications and the scheduler applies its timeout.
_KV_POLL_S = 0.05
# How often a client hears from the core at least; clients declare a core dead after
# Env.PEER_TIMEOUT_S of silence.
_HEARTBEAT_S = min(1.0, Env.PEER_TIMEOUT_S / 5)
_RETRY_S = 0.005  # resend interval while a client's backlog waits (not connected yet, full)


def _endpoint(sock: zmq.Socket) -> str:
    """The address a socket is bound to, with the OS-chosen port of a `tcp://host:*` bind."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class EngineCore:
    """Scheduler + executor; no sockets (the offline tests drive it directly)."""

    def __init__(self, config: EngineConfig, executor: Executor):
        self.config = config
        self.executor = executor
        report = executor.profile_memory()
        num_blocks = config.cache.num_gpu_blocks_override
        if num_blocks is None:
            num_blocks = report.available_bytes // report.bytes_per_block
        if num_blocks < 2:
            raise ValueError(f"not enough memory for the KV cache: {num_blocks} blocks of "
                             f"{report.bytes_per_block} bytes fit")
        executor.init_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config, num_blocks)
        # Steps sent whose results are not applied yet, oldest first. Between step() calls at
        # most `max_in_flight` remain: 1 with async scheduling, 0 without.
        self.in_flight: collections.deque[ExecuteStep] = collections.deque()
        self.max_in_flight = 1 if config.scheduler.async_scheduling else 0
        self.asleep: set[str] = set()  # sleep mode: parts (SLEEP_TAGS) not woken yet
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.cache.block_size)

    def add_request(self, req: AddRequest) -> list[TokenDelta]:
        refused = self.scheduler.add_request(req)
        return [refused] if refused is not None else []

    def abort(self, request_ids: list[str]) -> list[TokenDelta]:
        return self.scheduler.abort_requests(request_ids)

    def has_work(self) -> bool:
        """True while a request is unfinished or a sent step's result is still to be applied."""
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    # ------------------------------------------------------------ sleep mode

    def sleep(self, level: int) -> None:
        """Release the workers' weights (level 1: to host memory, 2: discarded) and KV cache.

        Only when idle; requests that arrive while asleep wait until every part is awake."""
        if not self.config.model.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with --enable-sleep-mode")
        if level not in (1, 2):
            raise ValueError(f"level: must be 1 or 2, got {level}")
        if self.asleep:
            raise ValueError("already asleep")
        if self.has_work() or self.scheduler.has_held_blocks():
            raise ValueError("the engine is busy: sleep when no request is running (and no "
                             "decode instance still has to read KV blocks)")
        self._worker_call(self.executor.sleep(level))
        self.scheduler.reset_prefix_cache()  # the cached KV contents are gone
        self.asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back the named parts (default: all); steps resume once all are awake."""
        tags = list(SLEEP_TAGS) if tags is None else tags
        unknown = set(tags) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"tags: unknown {sorted(unknown)}; choose from {list(SLEEP_TAGS)}")
        if self.asleep & set(tags):
            self._worker_call(self.executor.wake_up(sorted(self.asleep & set(tags))))
            self.asleep -= set(tags)

    def reload_weights(self, path: str | None = None) -> None:
        """Load the weights again from `path` (default: the served model's directory)."""
        if self.has_work():
            raise ValueError("the engine is busy: reload weights when no request is running")
        self._worker_call(self.executor.reload_weights(path or self.config.model.model))
        self.scheduler.reset_prefix_cache()  # cached KV came from the old weights

    @staticmethod
    def _worker_call(result: ControlResult) -> None:
        if not result.ok:
            raise ValueError(result.error)

    def step(self) -> list[TokenDelta]:
        """Schedule and send the next step, then apply the oldest result beyond the depth."""
        step = self.scheduler.schedule()
        if step is not None:
            self.executor.submit(step)
            self.in_flight.append(step)
            if len(self.in_flight) <= self.max_in_flight:
                return []  # let it run while the next call schedules the step after it
        if not self.in_flight:
            return []
        done = self.in_flight.popleft()
        return self.scheduler.update(done, self.executor.result(done.step_id))


class EngineCoreProc:
    """The engine-core process: sockets, I/O threads and the busy loop around `EngineCore`."""

    def __init__(self, config: EngineConfig, input_addr: str, output_addrs: list[str],
                 dp_rank: int = 0,
                 on_bound: Callable[[str, list[str]], None] | None = None,
                 watch_clients: bool = False):
        self.ctx = zmq.Context()
        self.input_queue: queue.Queue = queue.Queue()
        self.output_queue: queue.Queue = queue.Queue()
        self.parent_pid = os.getppid()
        self.stopping = False
        self.client_of: dict[str, int] = {}  # request_id -> client_index
        self.num_clients = len(output_addrs)
        # The busy loop's latest stats; the output thread sends them with each heartbeat.
        self.latest_stats: SchedulerStats | None = None
        # A core on a headless node cannot watch the head's processes: once clients have
        # spoken, it exits after Env.PEER_TIMEOUT_S without any input (they ping every second).
        self.watch_clients = watch_clients
        self.last_input: float | None = None
        # Bound here, before the model loads, so clients (and a remote head) can connect early;
        # `tcp://host:*` addresses resolve to the port the OS picked.
        in_sock = self.ctx.socket(zmq.PULL)
        in_sock.bind(input_addr)
        out_socks = []
        for addr in output_addrs:
            sock = self.ctx.socket(zmq.PUSH)
            sock.bind(addr)
            out_socks.append(sock)
        self.input_addr = _endpoint(in_sock)
        self.output_addrs = [_endpoint(sock) for sock in out_socks]
        threading.Thread(target=self._input_thread, args=(in_sock,), daemon=True).start()
        self.output_thread = threading.Thread(target=self._output_thread, args=(out_socks,),
                                              daemon=True)
        self.output_thread.start()
        if on_bound is not None:
            on_bound(self.input_addr, self.output_addrs)
        self.executor = Executor(config)
        try:
            self.core = EngineCore(config, self.executor)
        except Exception:
            self.executor.shutdown()
            raise
        self.latest_stats = self.core.scheduler.stats()
        ready = CoreReady(engine_pid=os.getpid(), num_blocks=self.core.num_blocks,
                          block_size=config.cache.block_size,
                          max_model_len=self.core.scheduler.max_model_len,
                          vocab_size=config.model.vocab_size, dp_rank=dp_rank)
        for client in range(self.num_clients):
            self.output_queue.put((client, ready))

    # ------------------------------------------------------------ I/O threads

    def _input_thread(self, sock: zmq.Socket) -> None:
        while True:
            raw = sock.recv(copy=False)
            self.last_input = time.monotonic()
            try:
                self.input_queue.put(core_input_decoder.decode(raw.buffer))
            except Exception as exc:  # a malformed message must not take the engine down
                logger.error("dropping undecodable input: %s", exc)

    def _output_thread(self, socks: list[zmq.Socket]) -> None:
        """Send queued outputs, never blocking one client on another, plus heartbeats.

        Each client has its own backlog, sent without blocking: a client that has not connected
        yet (or reads slowly) delays only its own messages. A client that got nothing for
        `_HEARTBEAT_S` gets an empty `EngineOutputs` carrying the latest stats, so it can tell a
        live idle core from a dead one (a remote core has no pid to watch) and balance load.
        """
        backlog: list[collections.deque] = [collections.deque() for _ in socks]
        last_sent = [time.monotonic()] * len(socks)
        stopping = False
        while True:
            try:
                item = self.output_queue.get(
                    timeout=_RETRY_S if any(backlog) else _HEARTBEAT_S / 2)
                while True:
                    client, msg = item
                    if msg is None:
                        stopping = True
                    else:
                        backlog[client].append(encode(msg))
                    item = self.output_queue.get_nowait()
            except queue.Empty:
                pass
            now = time.monotonic()
            for i, sock in enumerate(socks):
                if not backlog[i] and now - last_sent[i] > _HEARTBEAT_S and not stopping:
                    backlog[i].append(encode(EngineOutputs(stats=self.latest_stats,
                                                           timestamp=time.time())))
                while backlog[i]:
                    try:
                        sock.send(backlog[i][0], flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    backlog[i].popleft()
                    last_sent[i] = now
            if stopping:
                for sock, left in zip(socks, backlog, strict=True):
                    sock.setsockopt(zmq.SNDTIMEO, 1000)
                    try:
                        for raw in left:
                            sock.send(raw, copy=False)
                    except zmq.Again:
                        pass  # that client is gone
                    sock.close(linger=1000)  # flush what is queued before the process exits
                return

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        last_check = time.monotonic()
        try:
            while not self.stopping:
                # Asleep: requests wait (the scheduler keeps them) until every part is awake.
                runnable = self.core.has_work() and not self.core.asleep
                holding = self.core.scheduler.has_held_blocks()
                self._process_inputs(block=not runnable,
                                     timeout=_KV_POLL_S if holding else _IDLE_POLL_S)
                if (self.core.has_work() or holding) and not self.core.asleep:
                    self._emit(self.core.step())
                    if holding:  # freed blocks show in the heartbeat's stats
                        self.latest_stats = self.core.scheduler.stats()
                if time.monotonic() - last_check > _IDLE_POLL_S:
                    last_check = time.monotonic()
                    if os.getppid() != self.parent_pid:
                        logger.error("parent process died; shutting down")
                        break
                    if self._clients_gone():
                        logger.error("no word from the head node's API servers for %gs; "
                                     "shutting down", Env.PEER_TIMEOUT_S)
                        break
                    self.executor.check_alive()
        except EngineDeadError as exc:
            logger.error("engine dead: %s", exc)
            self._broadcast(EngineOutputs(engine_error=f"engine dead: {exc}",
                                          timestamp=time.time()))
            self._shutdown()
            raise SystemExit(1) from None
        self._shutdown()

    def _clients_gone(self) -> bool:
        return self.watch_clients and self.last_input is not None and \
            time.monotonic() - self.last_input > Env.PEER_TIMEOUT_S

    def _process_inputs(self, block: bool, timeout: float = _IDLE_POLL_S) -> None:
        try:
            msg = self.input_queue.get(timeout=timeout) if block else \
                self.input_queue.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg)
            try:
                msg = self.input_queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, msg) -> None:
        match msg:
            case AddRequest():
                self.client_of[msg.request_id] = msg.client_index
                self._emit(self.core.add_request(msg))
            case Abort(request_ids=ids):
                self._emit(self.core.abort(ids))
            case Control():
                self._control(msg)

    def _control(self, msg: Control) -> None:
        result = ControlResult(call_id=msg.call_id)
        try:
            if msg.op == "reset_prefix_cache":
                result.value = int(self.core.scheduler.reset_prefix_cache())
            elif msg.op == "remove_lora" and msg.lora is not None:
                self.core.scheduler.remove_lora(msg.lora.int_id)
            elif msg.op == "shutdown":
                self.stopping = True
            elif msg.op == "sleep":
                self.core.sleep(msg.level)
            elif msg.op == "wake_up":
                self.core.wake_up(msg.tags)
            elif msg.op == "is_sleeping":
                result.value = int(bool(self.core.asleep))
            elif msg.op == "reload_weights":
                self.core.reload_weights(msg.path)
            elif msg.op not in ("get_stats", "ping"):
                raise ValueError(f"unknown op {msg.op!r}")
        except ValueError as e:
            result = ControlResult(call_id=msg.call_id, ok=False, error=str(e))
        self.latest_stats = self.core.scheduler.stats()
        out = EngineOutputs(control=result, stats=self.latest_stats, timestamp=time.time())
        self.output_queue.put((msg.client_index, out))

    def _emit(self, deltas: list[TokenDelta]) -> None:
        """Route deltas to the clients that own them; every client also gets fresh stats."""
        if not deltas:
            return
        per_client: dict[int, list[TokenDelta]] = {}
        for delta in deltas:
            client = self.client_of.get(delta.request_id, 0)
            if delta.finish_reason is not None:
                self.client_of.pop(delta.request_id, None)
            per_client.setdefault(client, []).append(delta)
        stats = self.latest_stats = self.core.scheduler.stats()
        now = time.time()
        for client, outs in per_client.items():
            self.output_queue.put((client, EngineOutputs(outputs=outs, stats=stats,
                                                         timestamp=now)))

    def _broadcast(self, msg: EngineOutputs) -> None:
        for client in range(self.num_clients):
            self.output_queue.put((client, msg))

    def _shutdown(self) -> None:
        self.executor.shutdown()
        self.output_queue.put((0, None))
        self.output_thread.join(timeout=2.0)
