"""Worker side of the NIXL KV connector: one NIXL agent per tensor-parallel rank.

The scheduler side (`enginecore/nixl_connector.py`) decides which blocks move; this side moves
them. Every rank registers its KV-cache tensors with its agent (DRAM on CPU, VRAM on CUDA); a
producer rank r also serves a side channel (ZMQ REP at side_channel_host:side_channel_port + r)
answering `NixlHello` with `NixlAgentInfo`: its agent metadata and cache layout. Around each step:

    before the forward   consumer: for each `KVRemoteRead` of the step, connect to the producer's
                         rank r (side channel, once per producer), READ the remote blocks into
                         the local ones, wait for every read; the ranks agree (MIN over the TP
                         group) on which succeeded, then each notifies its producer rank with the
                         producer's request id (after the agreement: no producer rank frees a
                         block another consumer rank still reads)
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
_XFER_TIMEOUT_S = 60.0  # one step's reads, all together


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
        """Reads before the forward, notifications after it (see the module docstring)."""
        self.register(runner.kv_caches)
        reads = step.kv_transfer.reads if step.kv_transfer is not None else []
        done, failed = self._read_all(reads) if reads else ([], [])
        result = runner.execute(step)
        result.kv_recv_done, result.kv_recv_failed = done, failed
        if self.is_producer:
            result.kv_send_done = [msg.decode(errors="replace")
                                   for msgs in self.agent.get_new_notifs().values()
                                   for msg in msgs]
        return result

    def _read_all(self, reads: list[KVRemoteRead]) -> tuple[list[str], list[str]]:
        """Run the reads together; (request ids read on every rank, ids failed on any)."""
        handles: dict[int, object] = {}
        ok = [True] * len(reads)
        for i, read in enumerate(reads):
            try:
                handle = self._start(read)
                if handle is not None:
                    handles[i] = handle
            except Exception as exc:
                ok[i] = False
                logger.warning("request %s: NIXL read from %s:%d failed: %s", read.req_id,
                               read.host, read.port + self.rank, exc)
        broken = self._wait(reads, handles, ok)
        # Every rank must agree: a block read on rank 0 but not on rank 1 is not usable.
        ok = [bool(self.tp.min(int(flag))) for flag in ok]
        for read in reads:
            self._notify(read)
        for read in broken:
            self._forget(read)
        return ([r.req_id for r, flag in zip(reads, ok, strict=True) if flag],
                [r.req_id for r, flag in zip(reads, ok, strict=True) if not flag])

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

    def _wait(self, reads: list[KVRemoteRead], handles: dict[int, object],
              ok: list[bool]) -> list[KVRemoteRead]:
        """Wait for every posted read (marking failures in `ok`); the reads whose transfer
        failed: their producer is asked again next time."""
        broken = []
        deadline = time.monotonic() + _XFER_TIMEOUT_S
        while handles:
            for i, handle in list(handles.items()):
                state = self.agent.check_xfer_state(handle)
                late = time.monotonic() > deadline
                if state == "PROC" and not late:
                    continue
                if state != "DONE":
                    ok[i] = False
                    logger.warning("request %s: NIXL read %s", reads[i].req_id,
                                   "timed out" if late else "failed")
                    broken.append(reads[i])
                self.agent.release_xfer_handle(handle)
                del handles[i]
        return broken

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
