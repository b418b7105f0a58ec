"""`Worker`: one process per device. Reads `WorkerInput` from the broadcast ring, runs it, and
answers on its own response ring: rank 0 answers everything, the other tensor-parallel ranks
answer controls only (their memory report counts: the core takes the minimum) and errors.

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
import threading
import time
import traceback

import torch

from enginecore.config import EngineConfig
from enginecore.protocol import (
    ControlResult,
    ExecuteStep,
    InitKVCache,
    MemoryReport,
    ProfileMemory,
    ReloadWeights,
    Shutdown,
    Sleep,
    WakeUp,
    WorkerError,
    encode,
    worker_input_decoder,
)
from shm import BroadcastQueue
from workers.kv_transfer import make_kv_worker
from workers.models import read_hf_config, resolve_dtype
from workers.parallel import destroy_tp_group, init_tp_group
from workers.runner import ModelRunner
from workers.sleep_mode import SleepMode

logger = logging.getLogger("workers")

_CPU_KV_DEFAULT_BYTES = 512 << 20


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    """CPU, or the GPU of this rank: ranks map to visible GPUs in order (local rank = rank)."""
    want = config.parallel.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        size = config.parallel.tensor_parallel_size
        visible = torch.cuda.device_count()
        if size > visible:
            raise ValueError(f"tensor_parallel_size={size} exceeds the {visible} visible "
                             "GPU(s) (CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


class Worker:
    def __init__(self, config: EngineConfig, rank: int, parent_pid: int,
                 dist_init: str | None = None):
        self.config = config
        self.rank = rank
        self.parent_pid = parent_pid
        torch.manual_seed(config.model.seed)
        self.device = resolve_device(config, rank)
        # GPU memory other processes (another engine sharing the GPU) hold before this worker
        # allocates anything: not charged to this instance's gpu_memory_utilization, as in vLLM.
        self._others_bytes = 0
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self._others_bytes = total - free
        parallel = config.parallel
        self.tp = init_tp_group(rank, parallel.tensor_parallel_size, dist_init, self.device,
                                parallel.enable_expert_parallel)
        self.dtype = resolve_dtype(config.model.dtype, self.device,
                                   read_hf_config(config.model.model))
        self.runner = ModelRunner(config, self.device, self.dtype, self.tp)
        self.sleep_mode = SleepMode(self.runner)
        self.kv_transfer = make_kv_worker(config, rank, self.tp)  # disaggregated prefill, or None
        if self.tp.size > 1:
            # A rank blocked in a collective never polls the rings: watch the parent instead.
            threading.Thread(target=self._exit_with_parent, daemon=True).start()

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def _exit_with_parent(self) -> None:
        while not self.parent_gone():
            time.sleep(0.5)
        os._exit(1)

    def run(self, inq: BroadcastQueue, outq: BroadcastQueue | None) -> bool:
        """Serve until Shutdown (returns True) or a failure, reported first (returns False)."""
        while True:
            msg = worker_input_decoder.decode(inq.get(should_abort=self.parent_gone))
            try:
                reply = self.handle(msg)
            except Exception:
                reply = WorkerError(message=f"worker {self.rank}: {traceback.format_exc()}")
            # Step results come from rank 0 only: every rank holds the same sampled tokens.
            answers = self.tp.is_first or not isinstance(msg, ExecuteStep)
            if outq is not None and (answers or isinstance(reply, WorkerError)):
                outq.put(encode(reply), should_abort=self.parent_gone)
            if isinstance(reply, WorkerError):
                return False  # peers may be blocked in a collective: no orderly group teardown
            if isinstance(msg, Shutdown):
                destroy_tp_group()
                return True

    def handle(self, msg):  # -> WorkerOutput
        match msg:
            case ExecuteStep() if self.kv_transfer is not None:
                return self.kv_transfer.run_step(msg, self.runner)
            case ExecuteStep(kv_transfer=None):
                return self.runner.execute(msg)
            case ExecuteStep():
                raise AssertionError("KV transfer step without a connector")
            case ProfileMemory(call_id=call_id):
                return MemoryReport(call_id=call_id, available_bytes=self.available_kv_bytes(),
                                    bytes_per_block=self.runner.bytes_per_block())
            case InitKVCache(call_id=call_id, num_blocks=num_blocks):
                self.runner.init_kv_cache(num_blocks)
                if self.kv_transfer is not None:  # NIXL: peers read the cache from now on
                    self.kv_transfer.register(self.runner.kv_caches)
                return ControlResult(call_id=call_id, value=num_blocks)
            case Shutdown(call_id=call_id):
                return ControlResult(call_id=call_id)
            case Sleep() | WakeUp() | ReloadWeights():
                return self.sleep_control(msg)
        raise TypeError(f"unexpected worker input {type(msg).__name__}")

    def sleep_control(self, msg: Sleep | WakeUp | ReloadWeights) -> ControlResult:
        """Sleep-mode calls; a failure is answered (ok=False), not fatal to the engine.

        The value is the device's free memory in bytes afterwards (0 on CPU)."""
        try:
            match msg:
                case Sleep(level=level):
                    self.sleep_mode.sleep(level)
                case WakeUp(tags=tags):
                    self.sleep_mode.wake_up(tags)
                case ReloadWeights(path=path):
                    if "weights" in self.sleep_mode.asleep:
                        raise RuntimeError("weights are asleep: wake_up(tags=['weights']) first")
                    self.runner.reload_weights(path)
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            return ControlResult(call_id=msg.call_id, ok=False, error=str(e))
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        return ControlResult(call_id=msg.call_id, value=free)

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
        reserved = torch.cuda.memory_reserved(self.device)
        # This instance's memory outside torch's allocator (NCCL, NIXL, ...): what was in use
        # at start (other processes) does not count against gpu_memory_utilization.
        non_torch = max(total - free - reserved - self._others_bytes, 0)
        graph_reserve = 0 if self.config.model.enforce_eager else 512 << 20
        budget = total * cache.gpu_memory_utilization - non_torch - peak - graph_reserve
        # Never more than is actually free (others may have grown since the start).
        budget = min(budget, free + reserved - peak - graph_reserve)
        logger.info("memory: total %.1f GiB, weights+activations peak %.1f GiB, "
                    "other %.1f GiB -> KV cache %.1f GiB", total / 2**30, peak / 2**30,
                    non_torch / 2**30, budget / 2**30)
        return max(int(budget), 0)
