"""Worker side of disaggregated prefill: moves KV blocks between the cache and the block store.

The scheduler side (`enginecore/kv_transfer.py`) decides which blocks move and names them; this
side copies bytes around one step's forward: `load` before it, `save` after it. The worker runs
steps in order, so a block saved after step N's forward holds exactly what N wrote, and a block
loaded before step N's forward is in place before anything reads it.

Dimension legend: L layers, B blocks moved, S block_size, H kv heads, D head dim.
One layer's cache is [2, num_blocks, S, H, D] (K and V); one block in the store is the file
`<hash>.r<rank>` holding [L, 2, S, H, D] of this tensor-parallel rank's heads, raw bytes in the
cache dtype. Files are written under a temporary name and renamed, so a reader never sees half
a block.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from enginecore.config import EngineConfig, KVTransferConfig
from enginecore.protocol import ExecuteStep, KVTransferMeta, StepResult
from workers.nixl_worker import NixlKVWorker
from workers.parallel import SINGLE, TPGroup


class SharedMemoryKVWorker:
    """Worker half of `SharedMemoryConnector`, for one tensor-parallel rank."""

    def __init__(self, config: EngineConfig, rank: int):
        assert config.kv_transfer is not None
        self.store = config.kv_transfer.store_dir(config.kv_store_fingerprint())
        self.rank = rank

    def register(self, kv_caches: list[torch.Tensor]) -> None:
        """Nothing to register: blocks go through files."""

    def run_step(self, step: ExecuteStep, runner) -> StepResult:
        """Loads before the step's forward, saves after it."""
        meta = step.kv_transfer
        if meta is not None:
            self.load(meta, runner.kv_caches)
        result = runner.execute(step)
        if meta is not None:
            self.save(meta, runner.kv_caches)
        return result

    def _path(self, key: str) -> str:
        return KVTransferConfig.block_file(self.store, key, self.rank)

    @torch.inference_mode()
    def load(self, meta: KVTransferMeta, kv_caches: list[torch.Tensor]) -> None:
        """Copy `meta.loads` from the store into their cache blocks (before the forward)."""
        if not meta.loads:
            return
        ref = kv_caches[0]
        block_shape = (len(kv_caches), 2, *ref.shape[2:])  # [L, 2, S, H, D]
        blocks = [torch.from_numpy(np.fromfile(self._path(io.key), dtype=np.uint8))
                  .view(ref.dtype).view(block_shape) for io in meta.loads]
        data = torch.stack(blocks, dim=2).to(ref.device)  # [L, 2, B, S, H, D]
        ids = torch.tensor([io.block_id for io in meta.loads], device=ref.device)
        for layer, cache in enumerate(kv_caches):
            cache[:, ids] = data[layer]

    @torch.inference_mode()
    def save(self, meta: KVTransferMeta, kv_caches: list[torch.Tensor]) -> None:
        """Copy `meta.saves` from the cache into the store (after the forward wrote them)."""
        if not meta.saves:
            return
        ids = torch.tensor([io.block_id for io in meta.saves], device=kv_caches[0].device)
        data = torch.stack([cache[:, ids] for cache in kv_caches]).cpu()  # [L, 2, B, S, H, D]
        for i, io in enumerate(meta.saves):
            raw = data[:, :, i].contiguous().view(torch.uint8).numpy()
            path = self._path(io.key)
            tmp = f"{path}.tmp{os.getpid()}"
            raw.tofile(tmp)
            os.replace(tmp, path)


def make_kv_worker(config: EngineConfig, rank: int,
                   tp: TPGroup = SINGLE) -> SharedMemoryKVWorker | NixlKVWorker | None:
    """The worker-side connector `config.kv_transfer` asks for (None when it is off)."""
    if config.kv_transfer is None:
        return None
    if config.kv_transfer.kv_connector == "NixlConnector":
        return NixlKVWorker(config, rank, tp)
    return SharedMemoryKVWorker(config, rank)
