"""Worker side of the NIXL KV connector: one NIXL agent per tensor-parallel rank.

The scheduler side (`enginecore/nixl_connector.py`) decides which blocks move; this side moves
them. Every rank registers its KV-cache tensors with its agent (DRAM on CPU, VRAM on CUDA); a
producer rank r also serves a side channel (ZMQ REP at side_channel_host:side_channel_port + r)
answering `NixlHello` with `NixlAgentInfo`: its agent metadata and cache layout. Each step:

    before the forward   consumer: post a READ for each `KVRemoteRead` of the step (after
                         connecting to the producer's rank r over its side channel, once per
                         producer), then poll every read in flight: they run in the background
                         while steps go on (the reading request is not scheduled meanwhile). A
                         read is finished when the ranks agree (MIN over the TP group) that it is
                         done everywhere, or failed somewhere and finished everywhere; then each
                         rank notifies its producer rank with the producer's request id (no
                         producer rank frees a block another consumer rank still reads) and
                         rank 0 reports it: StepResult.kv_recv_done / kv_recv_failed
    after the forward    producer: collect notifications -> StepResult.kv_send_done

Dimension legend: L layers, P planes (2: K and V), N num_blocks, S block_size, H kv heads,
D head dim. One layer's cache is [P, N, S, H, D], contiguous, so block b of plane p of layer l
is the `block_bytes` at base[l] + p * plane_bytes + b * block_bytes. Runs of consecutive block
ids on both sides become one descriptor.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from types import ModuleType

import msgspec
import torch
import zmq

from enginecore.config import EngineConfig
from enginecore.protocol import (
    ExecuteStep,
    KVRemoteRead,
    NixlAgentInfo,
    NixlHello,
    StepResult,
    encode,
    nixl_side_channel_decoder,
)
from workers.parallel import TPGroup

logger = logging.getLogger("workers.nixl")

_HANDSHAKE_TIMEOUT_MS = 5000  # side-channel answer from a producer; past it the read fails
_XFER_TIMEOUT_S = 60.0  # one read; past it the read is aborted and fails


def import_nixl() -> ModuleType:
    """NIXL's Python API: the `nixl` meta package's, else a CUDA-specific wheel's own."""
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("kv_connector NixlConnector needs the `nixl` package "
                      "(pip install 'tinyllm-serve[nixl]')")


def cache_layout(kv_caches: list[torch.Tensor]) -> NixlAgentInfo:
    """The layout fields of NixlAgentInfo for these cache tensors (one per layer)."""
    ref = kv_caches[0]
    for cache in kv_caches:
        if not cache.is_contiguous() or cache.shape != ref.shape or cache.dtype != ref.dtype:
            raise ValueError("NixlConnector needs contiguous per-layer caches of one shape")
    size = ref.element_size()
    return NixlAgentInfo(
        mem_type="VRAM" if ref.is_cuda else "DRAM",
        device_id=(ref.device.index or 0) if ref.is_cuda else 0,
        base_addrs=[c.data_ptr() for c in kv_caches], num_blocks=ref.shape[1],
        block_bytes=ref.stride(1) * size, plane_bytes=ref.stride(0) * size,
        num_planes=ref.shape[0])


def block_descs(layout: NixlAgentInfo, runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(address, bytes, device) per layer, plane and run (first block id, block count)."""
    return [(base + p * layout.plane_bytes + first * layout.block_bytes,
             count * layout.block_bytes, layout.device_id)
            for base in layout.base_addrs for p in range(layout.num_planes)
            for first, count in runs]


def paired_runs(local: list[int], remote: list[int]) -> tuple[list[tuple[int, int]],
                                                              list[tuple[int, int]]]:
    """Split aligned block-id lists into runs consecutive on both sides: (first, count) each."""
    lruns: list[tuple[int, int]] = []
    rruns: list[tuple[int, int]] = []
    for i, (lb, rb) in enumerate(zip(local, remote, strict=True)):
        if i and lb == local[i - 1] + 1 and rb == remote[i - 1] + 1:
            lruns[-1] = (lruns[-1][0], lruns[-1][1] + 1)
            rruns[-1] = (rruns[-1][0], rruns[-1][1] + 1)
        else:
            lruns.append((lb, 1))
            rruns.append((rb, 1))
    return lruns, rruns


# A read's state on one rank, ordered so that the MIN over ranks is the read's state.
_IN_FLIGHT, _FAILED, _DONE = 0, 1, 2


class _Read:
    """A posted read on this rank: its transfer handle and state."""

    __slots__ = ("read", "deadline", "handle", "state", "broken")

    def __init__(self, read: KVRemoteRead, deadline: float):
        self.read = read
        self.deadline = deadline
        self.handle: object | None = None
        self.state = _IN_FLIGHT
        self.broken = False  # the transfer failed: ask the producer's side channel again


class _Remote(msgspec.Struct):
    """A producer rank this consumer rank has connected to."""

    agent_name: str
    info: NixlAgentInfo


class NixlKVWorker:
    """Worker half of `NixlConnector`, for one tensor-parallel rank."""

    def __init__(self, config: EngineConfig, rank: int, tp: TPGroup):
        kv = config.kv_transfer
        assert kv is not None
        self.rank, self.tp = rank, tp
        self.engine_id = kv.nixl_engine_id
        self.is_producer = kv.is_producer
        nixl = import_nixl()
        backends = kv.kv_connector_extra_config.get("backends", ["UCX"])
        # Unique: two instances may share an engine id's default, and names key NIXL's peers.
        self.agent = nixl.nixl_agent(f"{self.engine_id}-r{rank}-{uuid.uuid4().hex[:8]}",
                                     nixl.nixl_agent_config(backends=backends))
        self.layout: NixlAgentInfo | None = None  # of the registered caches
        self._registered: tuple[list[int], object] | None = None  # (data_ptrs, reg handle)
        self._lock = threading.Lock()  # layout, shared with the side-channel thread
        self.remotes: dict[tuple[str, str, int], _Remote] = {}
        self.reads: dict[str, _Read] = {}  # posted, not yet finished on every rank
        self.ctx = zmq.Context()
        if self.is_producer:
            sock = self.ctx.socket(zmq.REP)
            # Bound here, not in the thread: a taken port fails the worker's start loudly.
            addr = f"tcp://{kv.side_channel_host}:{kv.side_channel_port + rank}"
            try:
                sock.bind(addr)
            except zmq.ZMQError as e:
                raise ValueError(f"kv_transfer_config side_channel_port: cannot bind {addr} "
                                 f"for rank {rank}: {e}") from None
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    # ------------------------------------------------ registration and side channel

    def register(self, kv_caches: list[torch.Tensor]) -> None:
        """Register the cache tensors with the agent (again if they moved, e.g. sleep mode)."""
        ptrs = [c.data_ptr() for c in kv_caches]
        if not kv_caches or (self._registered is not None and self._registered[0] == ptrs):
            return
        with self._lock:
            if self._registered is not None:
                self.agent.deregister_memory(self._registered[1])
            handle = self.agent.register_memory(self.agent.get_reg_descs(kv_caches))
            self._registered = (ptrs, handle)
            layout = cache_layout(kv_caches)
            # Metadata after registration: it carries what peers need to address this memory.
            self.layout = msgspec.structs.replace(
                layout, engine_id=self.engine_id, agent_metadata=self.agent.get_agent_metadata())

    def _serve(self, sock: zmq.Socket) -> None:
        while True:
            raw = sock.recv()
            try:
                reply = self._answer(nixl_side_channel_decoder.decode(raw))
            except Exception as exc:  # a bad peer must not end the side channel
                logger.warning("NIXL side channel: %s", exc)
                reply = NixlAgentInfo(error=f"bad side-channel request: {exc}")
            sock.send(encode(reply))

    def _answer(self, msg: object) -> NixlAgentInfo:
        if not isinstance(msg, NixlHello):
            return NixlAgentInfo(error="expected NixlHello")
        if msg.tp_size != self.tp.size or msg.tp_rank != self.rank:
            return NixlAgentInfo(error=f"tp_size: consumer rank {msg.tp_rank}/{msg.tp_size} "
                                       f"asked producer rank {self.rank}/{self.tp.size}; "
                                       "NixlConnector needs equal tensor_parallel_size")
        with self._lock:
            return self.layout or NixlAgentInfo(error="KV cache not initialized yet")

    # ------------------------------------------------ one step

    def run_step(self, step: ExecuteStep, runner) -> StepResult:
        """Post the step's reads and advance all in flight, run the forward, collect the
        producer-side notifications (see the module docstring)."""
        self.register(runner.kv_caches)
        if step.kv_transfer is not None:
            for read in step.kv_transfer.reads:
                self._post(read)
        done, failed = self._progress() if self.reads else ([], [])
        result = runner.execute(step)
        result.kv_recv_done, result.kv_recv_failed = done, failed
        if self.is_producer:
            result.kv_send_done = [msg.decode(errors="replace")
                                   for msgs in self.agent.get_new_notifs().values()
                                   for msg in msgs]
        return result

    def _post(self, read: KVRemoteRead) -> None:
        """Start one read (a failure to start is a failed read, reported like any other)."""
        entry = _Read(read, time.monotonic() + _XFER_TIMEOUT_S)
        try:
            entry.handle = self._start(read)
            if entry.handle is None:
                entry.state = _DONE
        except Exception as exc:
            entry.state = _FAILED
            logger.warning("request %s: NIXL read from %s:%d failed: %s", read.req_id,
                           read.host, read.port + self.rank, exc)
        self.reads[read.req_id] = entry

    def _progress(self) -> tuple[list[str], list[str]]:
        """Poll the reads in flight; (request ids read on every rank, ids failed on any rank
        and finished on all). A read still in flight anywhere is reported later."""
        for entry in self.reads.values():
            if entry.state == _IN_FLIGHT:
                self._poll(entry)
        done, failed = [], []
        # Every rank holds the same reads in the same order (same steps): one MIN each.
        for req_id, entry in list(self.reads.items()):
            state = self.tp.min(entry.state)
            if state == _IN_FLIGHT:
                continue
            del self.reads[req_id]
            self._notify(entry.read)
            if entry.broken:
                self._forget(entry.read)
            (done if state == _DONE else failed).append(req_id)
        return done, failed

    def _start(self, read: KVRemoteRead) -> object | None:
        """Post one read; its transfer handle (None: no blocks, only the notification)."""
        remote = self._connect(read)
        if not read.local_block_ids:
            return None
        if max(read.remote_block_ids) >= remote.info.num_blocks:
            raise ValueError(f"remote_block_ids: id {max(read.remote_block_ids)} is past the "
                             f"producer's {remote.info.num_blocks} blocks")
        lruns, rruns = paired_runs(read.local_block_ids, read.remote_block_ids)
        assert self.layout is not None
        local = self.agent.get_xfer_descs(block_descs(self.layout, lruns), self.layout.mem_type)
        theirs = self.agent.get_xfer_descs(block_descs(remote.info, rruns), remote.info.mem_type)
        handle = self.agent.initialize_xfer("READ", local, theirs, remote.agent_name)
        if self.agent.transfer(handle) == "ERR":
            raise RuntimeError("transfer refused")
        return handle

    def _poll(self, entry: _Read) -> None:
        state = self.agent.check_xfer_state(entry.handle)
        if state == "PROC":
            if time.monotonic() < entry.deadline:
                return
            try:
                self.agent.release_xfer_handle(entry.handle)  # aborts it
            except Exception:
                return  # cannot be aborted yet: it may still write, so it stays in flight
            logger.warning("request %s: NIXL read timed out", entry.read.req_id)
            entry.state, entry.broken = _FAILED, True
            return
        self.agent.release_xfer_handle(entry.handle)
        if state == "DONE":
            entry.state = _DONE
        else:
            logger.warning("request %s: NIXL read failed (%s)", entry.read.req_id, state)
            entry.state, entry.broken = _FAILED, True

    def _notify(self, read: KVRemoteRead) -> None:
        """Tell the producer rank it may free the blocks (failed reads too: no retry comes)."""
        remote = self.remotes.get((read.engine_id, read.host, read.port))
        if remote is None:
            return  # never reached: its timeout frees them
        try:
            self.agent.send_notif(remote.agent_name, read.remote_request_id.encode())
        except Exception as exc:
            logger.warning("request %s: notifying the producer failed: %s", read.req_id, exc)

    # ------------------------------------------------ producers

    def _connect(self, read: KVRemoteRead) -> _Remote:
        """The producer rank of `read`, asked over its side channel on first use."""
        key = (read.engine_id, read.host, read.port)
        remote = self.remotes.get(key)
        if remote is not None:
            return remote
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, _HANDSHAKE_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDTIMEO, _HANDSHAKE_TIMEOUT_MS)
        try:
            sock.connect(f"tcp://{read.host}:{read.port + self.rank}")
            sock.send(encode(NixlHello(tp_rank=self.rank, tp_size=self.tp.size)))
            info = nixl_side_channel_decoder.decode(sock.recv())
        except zmq.Again:
            raise ConnectionError("no answer on the side channel") from None
        finally:
            sock.close()
        if not isinstance(info, NixlAgentInfo) or info.error is not None:
            raise ValueError(getattr(info, "error", None) or "unexpected side-channel answer")
        self._check_layout(read, info)
        name = self.agent.add_remote_agent(info.agent_metadata)
        remote = _Remote(name.decode() if isinstance(name, bytes) else name, info)
        self.remotes[key] = remote
        return remote

    def _check_layout(self, read: KVRemoteRead, info: NixlAgentInfo) -> None:
        if info.engine_id != read.engine_id:
            raise ValueError(f"remote_engine_id: {read.engine_id!r}, but {read.host}:"
                             f"{read.port} is {info.engine_id!r}")
        mine = self.layout
        assert mine is not None
        if (len(info.base_addrs), info.num_planes, info.block_bytes) != \
                (len(mine.base_addrs), mine.num_planes, mine.block_bytes):
            raise ValueError("the producer's KV cache has another layout (layers, block size, "
                             "kv heads, head dim or dtype): not the same model and settings")

    def _forget(self, read: KVRemoteRead) -> None:
        """Drop a producer after a failed transfer: the next read asks its side channel again."""
        remote = self.remotes.pop((read.engine_id, read.host, read.port), None)
        if remote is not None:
            try:
                self.agent.remove_remote_agent(remote.agent_name)
            except Exception:
                pass
