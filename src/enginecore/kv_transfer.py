"""Scheduler side of disaggregated prefill: the `KVConnector` protocol and the shared-memory one.

A KV connector has two halves, as in vLLM: this one, in the engine core, decides *which* blocks
move; the worker side (`workers/kv_transfer.py`) moves the bytes around each step's forward.
They talk only through `KVTransferMeta` in `ExecuteStep`.

`SharedMemoryConnector` keeps a block store in a directory both instances of one host see
(`/dev/shm` by default), one file per full block and tensor-parallel rank, named by the block's
prefix-cache hash. The hash chains over every token before and in the block (plus LoRA, salt),
so a name identifies the block's KV exactly, across instances of the same model:

    producer (prefill instance)                 consumer (decode instance)
    each step: full prompt blocks the step      admitting a request: after the local prefix-cache
    completes -> `saves` (after the forward)    hits, the run of next blocks found in the store
                                                -> allocated, counted as computed, `loads`
                                                (before the forward); the rest is computed

The consumer treats loaded blocks like prefix-cache hits (they count as cached tokens and are
registered in its own prefix cache once the step's result confirms them). At least the last
prompt token is always computed, so the first sampled token comes from the consumer's own
logits. A store is never trimmed by the engine: it is a cache the operator sizes and clears.
"""

from __future__ import annotations

import os
from typing import Protocol

from enginecore.config import EngineConfig, KVTransferConfig
from enginecore.nixl_connector import NixlConnector
from enginecore.protocol import KVBlockIO, KVTransferMeta


class KVConnector(Protocol):
    """Scheduler-side connector: which blocks to load and save; `take_meta` once per step."""

    def num_external_blocks(self, keys: list[str]) -> int:
        """How many of the blocks named by `keys` (consecutive, in order) can be loaded."""
        ...

    def add_loads(self, block_ids: list[int], keys: list[str]) -> None:
        """Load these blocks from the store before the next forward."""
        ...

    def add_saves(self, block_ids: list[int], keys: list[str]) -> None:
        """Save these blocks after the next forward (which computes them)."""
        ...

    def take_meta(self) -> KVTransferMeta | None:
        """The loads and saves for the step being built (None: nothing to do)."""
        ...


class SharedMemoryConnector:
    """Block store in a shared directory of this host (see the module docstring)."""

    def __init__(self, config: EngineConfig, kv: KVTransferConfig):
        self.kv = kv
        self.store = kv.store_dir(config.kv_store_fingerprint())
        self.world_size = config.parallel.tensor_parallel_size
        self.is_producer, self.is_consumer = kv.is_producer, kv.is_consumer
        self.saving: set[str] = set()  # keys this instance has asked to save (once each)
        self._loads: list[KVBlockIO] = []
        self._saves: list[KVBlockIO] = []
        if self.is_producer:
            os.makedirs(self.store, exist_ok=True)

    def _stored(self, key: str) -> bool:
        # Complete when every rank's file exists: workers write a temp file, then rename.
        return all(os.path.exists(KVTransferConfig.block_file(self.store, key, rank))
                   for rank in range(self.world_size))

    def num_external_blocks(self, keys: list[str]) -> int:
        if not self.is_consumer:
            return 0
        n = 0
        while n < len(keys) and self._stored(keys[n]):
            n += 1
        return n

    def add_loads(self, block_ids: list[int], keys: list[str]) -> None:
        self._loads += [KVBlockIO(b, k) for b, k in zip(block_ids, keys, strict=True)]

    def add_saves(self, block_ids: list[int], keys: list[str]) -> None:
        if not self.is_producer:
            return
        for block_id, key in zip(block_ids, keys, strict=True):
            if key not in self.saving and not self._stored(key):
                self.saving.add(key)
                self._saves.append(KVBlockIO(block_id, key))

    def take_meta(self) -> KVTransferMeta | None:
        if not (self._loads or self._saves):
            return None
        meta = KVTransferMeta(loads=self._loads, saves=self._saves)
        self._loads, self._saves = [], []
        return meta


def make_kv_connector(config: EngineConfig) -> KVConnector | None:
    """The scheduler-side connector `config.kv_transfer` asks for (None when it is off)."""
    if config.kv_transfer is None:
        return None
    if config.kv_transfer.kv_connector == "NixlConnector":
        return NixlConnector(config, config.kv_transfer)
    return SharedMemoryConnector(config, config.kv_transfer)
