"""`Worker`: one process per device. Reads `WorkerInput` from the broadcast ring, runs it, and
(rank 0 only) answers on the response ring.

Lifecycle, driven by the engine core's executor:
    ProfileMemory -> MemoryReport      how many KV blocks fit
    InitKVCache   -> ControlResult     allocate and bind the cache
    ExecuteStep   -> StepResult        every scheduler step
    Shutdown      -> ControlResult     then exit
Any exception while handling a message is reported as `WorkerError` before the process exits, so
the engine core fails loudly instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
import traceback

import torch

from enginecore.config import EngineConfig
from enginecore.protocol import (
    ControlResult,
    ExecuteStep,
    InitKVCache,
    MemoryReport,
    ProfileMemory,
    Shutdown,
    WorkerError,
    encode,
    worker_input_decoder,
)
from shm import BroadcastQueue
from workers.kv_transfer import make_kv_worker
from workers.models import read_hf_config, resolve_dtype
from workers.runner import ModelRunner

logger = logging.getLogger("workers")

_CPU_KV_DEFAULT_BYTES = 512 << 20


def resolve_device(config: EngineConfig) -> torch.device:
    want = config.parallel.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


class Worker:
    def __init__(self, config: EngineConfig, rank: int, parent_pid: int):
        if config.parallel.tensor_parallel_size != 1:
            raise NotImplementedError("tensor_parallel_size > 1 is not supported yet")
        self.config = config
        self.rank = rank
        self.parent_pid = parent_pid
        torch.manual_seed(config.model.seed)
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config.model.dtype, self.device,
                                   read_hf_config(config.model.model))
        self.runner = ModelRunner(config, self.device, self.dtype)
        self.kv_transfer = make_kv_worker(config, rank)  # disaggregated prefill, or None

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def run(self, inq: BroadcastQueue, outq: BroadcastQueue | None) -> None:
        while True:
            msg = worker_input_decoder.decode(inq.get(should_abort=self.parent_gone))
            try:
                reply = self.handle(msg)
            except Exception:
                reply = WorkerError(message=f"worker {self.rank}: {traceback.format_exc()}")
            if outq is not None:
                outq.put(encode(reply), should_abort=self.parent_gone)
            if isinstance(msg, Shutdown) or isinstance(reply, WorkerError):
                return

    def handle(self, msg):  # -> WorkerOutput
        match msg:
            case ExecuteStep(kv_transfer=None):
                return self.runner.execute(msg)
            case ExecuteStep(kv_transfer=meta):
                assert self.kv_transfer is not None, "KV transfer step without a connector"
                self.kv_transfer.load(meta, self.runner.kv_caches)
                result = self.runner.execute(msg)
                self.kv_transfer.save(meta, self.runner.kv_caches)
                return result
            case ProfileMemory(call_id=call_id):
                return MemoryReport(call_id=call_id, available_bytes=self.available_kv_bytes(),
                                    bytes_per_block=self.runner.bytes_per_block())
            case InitKVCache(call_id=call_id, num_blocks=num_blocks):
                self.runner.init_kv_cache(num_blocks)
                return ControlResult(call_id=call_id, value=num_blocks)
            case Shutdown(call_id=call_id):
                return ControlResult(call_id=call_id)
        raise TypeError(f"unexpected worker input {type(msg).__name__}")

    def available_kv_bytes(self) -> int:
        """Bytes the KV cache may use: measured on GPU, configured on CPU."""
        cache = self.config.cache
        if cache.kv_cache_memory_bytes is not None:
            return cache.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return _CPU_KV_DEFAULT_BYTES
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.runner.profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory outside torch's allocator (CUDA context, NCCL, other processes).
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        graph_reserve = 0 if self.config.model.enforce_eager else 512 << 20
        budget = total * cache.gpu_memory_utilization - non_torch - peak - graph_reserve
        logger.info("memory: total %.1f GiB, weights+activations peak %.1f GiB, "
                    "other %.1f GiB -> KV cache %.1f GiB", total / 2**30, peak / 2**30,
                    non_torch / 2**30, budget / 2**30)
        return max(int(budget), 0)
