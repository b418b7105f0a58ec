"""Scheduler side of the NIXL KV connector (vLLM's NixlConnector): which blocks a consumer reads
from which producer, and how long a producer holds them.

The worker side (`workers/nixl_worker.py`) registers every rank's KV cache with a NIXL agent and
moves the bytes. A request flows through two instances, routed by a proxy (scripts/pd_proxy.py):

    proxy -> P  kv_transfer_params {do_remote_decode}, max_tokens 1
    P           computes the prompt; on finishing HOLDS its blocks (no free) and answers
                kv_transfer_params {do_remote_prefill, remote_engine_id, remote_block_ids,
                remote_host, remote_port, remote_request_id, tp_size}
    proxy -> D  the request, with those kv_transfer_params
    D           admitting it: allocates blocks for the prompt's full blocks past its own prefix
                hits and queues a `KVRemoteRead` (the request leaves `waiting` for `recving`);
                the next step's workers post READs from P's cache (rank r from P's rank r)
                that run in the background; steps keep going (empty ones if nothing else
                runs) and each polls them; once finished the workers notify P (a NIXL
                notification naming the request)
    D           result `kv_recv_done`: the read blocks join D's prefix cache and the request
                goes back to the head of `waiting`, holding them; admitted with them counted as
                computed (cached tokens), it computes the rest (at least the last prompt token)
    P           a step result's `kv_send_done` (the notification arrived): frees the blocks;
                with no notification for `abort_request_timeout` seconds, frees them anyway

A failed read (P unreachable, bad remote parameters, a layout mismatch, a transfer error or
timeout) comes back as `kv_recv_failed`: D frees the blocks and computes the request itself. A
request aborted while its read is in flight keeps its blocks until the read has finished (the
READ may still write them), then frees them.
"""

from __future__ import annotations

import logging
import time

from enginecore.config import EngineConfig, KVTransferConfig
from enginecore.kv_cache import KVCacheManager
from enginecore.protocol import KVRemoteRead, KVTransferMeta, KVTransferParams, StepResult
from enginecore.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class NixlConnector:
    """Scheduler half of the NIXL connector (see the module docstring)."""

    def __init__(self, config: EngineConfig, kv: KVTransferConfig):
        self.engine_id = kv.nixl_engine_id
        self.host, self.port = kv.side_channel_host, kv.side_channel_port
        self.tp_size = config.parallel.tensor_parallel_size
        self.timeout = kv.abort_request_timeout
        self.is_producer, self.is_consumer = kv.is_producer, kv.is_consumer
        # Producer: finished requests whose blocks wait for a consumer: req_id -> (request,
        # monotonic deadline). They left the scheduler's `requests`; the blocks are still theirs.
        self.held: dict[str, tuple[Request, float]] = {}
        # Consumer: requests whose read is sent and not finished (aborted ones too: their
        # blocks are freed only when the read ends).
        self.recving: dict[str, Request] = {}
        self.num_read_blocks = 0  # cumulative blocks read from producers
        self._reads: list[KVRemoteRead] = []

    # ------------------------------------------------ KVConnector: no content-addressed store

    def num_external_blocks(self, keys: list[str]) -> int:
        return 0

    def add_loads(self, block_ids: list[int], keys: list[str]) -> None:
        raise AssertionError("NixlConnector loads by remote reads, never by key")

    def add_saves(self, block_ids: list[int], keys: list[str]) -> None:
        pass  # the producer's blocks stay in its own cache, held until read

    def take_meta(self) -> KVTransferMeta | None:
        if not self._reads:
            return None
        meta = KVTransferMeta(reads=self._reads)
        self._reads = []
        return meta

    def needs_step(self) -> bool:
        """Reads wait to be sent or are in flight: the next step must go out even if it
        computes nothing (the workers poll reads at each step)."""
        return bool(self._reads or self.recving)

    # ------------------------------------------------ consumer

    def wants_read(self, request: Request) -> bool:
        """Whether admitting `request` starts with a remote read (valid params; else logged)."""
        params = request.kv_transfer_params
        if params is None or not params.do_remote_prefill:
            return False
        error = params.remote_prefill_error(self.tp_size) if self.is_consumer else \
            "this instance's kv_role is kv_producer"
        if error is not None:
            logger.warning("request %s: computing the prompt locally: %s",
                           request.request_id, error)
            request.kv_transfer_params = None
            return False
        return True

    def start_read(self, request: Request, kv: KVCacheManager) -> bool:
        """Allocate the blocks the read fills and queue it; False: too few free blocks."""
        params = request.kv_transfer_params
        assert params is not None and params.remote_block_ids is not None
        hit_blocks, _ = kv.get_computed_blocks(request)
        size = kv.block_size
        # Never the last prompt token: D samples the first token from its own logits. Nothing
        # either when D may not skip prompt tokens (prompt logprobs): it only notifies P.
        num_full = 0
        if kv.may_look_up(request):
            num_full = min(len(params.remote_block_ids), (request.num_tokens - 1) // size)
        num_read = max(0, num_full - len(hit_blocks))
        new_ids = kv.allocate_slots(request, num_read * size, computed_blocks=hit_blocks)
        if new_ids is None:
            return False
        first = len(hit_blocks)
        self._reads.append(KVRemoteRead(
            request.request_id, params.remote_request_id, params.remote_engine_id,
            params.remote_host, params.remote_port, local_block_ids=new_ids[:num_read],
            remote_block_ids=params.remote_block_ids[first:first + num_read]))
        request.num_loaded_tokens = (first + num_read) * size
        request.kv_transfer_params = None  # read once: a preempted request recomputes
        self.recving[request.request_id] = request
        self.num_read_blocks += num_read
        return True

    def finish_reads(self, result: StepResult, kv: KVCacheManager) -> list[Request]:
        """Apply a step's read outcomes; the requests to put back at the head of `waiting`.

        Done: the read blocks hold verified KV, offered to later requests too (prefix cache).
        Failed: their blocks are freed and the request computes its prompt itself."""
        failed = set(result.kv_recv_failed)
        back = []
        for req_id in [*result.kv_recv_done, *result.kv_recv_failed]:
            request = self.recving.pop(req_id, None)
            if request is None:
                continue
            if request.status >= RequestStatus.FINISHED_STOPPED:  # aborted while reading
                kv.free(request)
                continue
            if req_id in failed:
                logger.warning("request %s: reading its KV from the prefill instance failed; "
                               "computing the prompt locally", req_id)
                kv.free(request)
                request.num_loaded_tokens = None
            else:
                kv.cache_full_blocks(request, request.num_loaded_tokens)
            back.append(request)
        return back

    def drop_loaded(self, waiting: list[Request], head: Request, kv: KVCacheManager) -> bool:
        """Free the read blocks that waiting requests other than `head` hold (they will compute
        their prompts instead): with nothing running, only they can keep `head` from ever
        fitting. True if any were freed."""
        dropped = False
        for request in waiting:
            if request is not head and request.num_loaded_tokens is not None:
                logger.warning("request %s: dropping its read KV blocks to make room",
                               request.request_id)
                kv.free(request)
                request.num_loaded_tokens = None
                dropped = True
        return dropped

    # ------------------------------------------------ producer

    def hold(self, request: Request, kv: KVCacheManager) -> KVTransferParams | None:
        """Keep a finishing request's prompt blocks for a consumer; the params that find them.

        None (free them as usual): not a do_remote_decode request, or not a producer."""
        params = request.kv_transfer_params
        if not self.is_producer or params is None or not params.do_remote_decode:
            return None
        num_full = len(request.prompt_token_ids) // kv.block_size
        block_ids = kv.block_ids(request.request_id)[:num_full]
        self.held[request.request_id] = (request, time.monotonic() + self.timeout)
        return KVTransferParams(
            do_remote_prefill=True, remote_engine_id=self.engine_id,
            remote_block_ids=block_ids, remote_host=self.host, remote_port=self.port,
            remote_request_id=request.request_id, tp_size=self.tp_size)

    def release(self, req_ids: list[str], kv: KVCacheManager) -> None:
        """Free the blocks of held requests a consumer has read (unknown ids: ignored)."""
        for req_id in req_ids:
            entry = self.held.pop(req_id, None)
            if entry is not None:
                kv.free(entry[0])

    def expire(self, kv: KVCacheManager) -> None:
        """Free held blocks no consumer read within abort_request_timeout."""
        if not self.held:
            return
        now = time.monotonic()
        for req_id, (request, deadline) in list(self.held.items()):
            if now >= deadline:
                logger.warning("request %s: no consumer read its KV blocks within %gs; freeing "
                               "them (abort_request_timeout)", req_id, self.timeout)
                del self.held[req_id]
                kv.free(request)
