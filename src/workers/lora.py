"""`LoRAManager`: the worker side of multi-LoRA serving.

Adapters travel by reference: a request's `NewReq.lora` names the adapter (name, int id, path).
The first time a worker sees an id it loads the PEFT directory into the CPU cache; each step,
the adapters of the step's requests are made resident in GPU slots, and the per-token slot index
is written to persistent device buffers that every `LoRALinear` reads (`workers/lora_layers.py`).

    PEFT dir --load--> CPU cache (LRU, max_cpu_loras) --copy--> GPU slots (LRU, max_loras)
                                                                  |
    step: requests' adapters -> slots -> token_slots [T] -> (sorted_token_ids, tile table)

The scheduler never puts more than max_loras distinct adapters in a step, so a step's adapters
always fit; a slot is only evicted for an adapter of a later step (least recently used first).
Adapters used by the current step are pinned for that step. `remove` (runtime unload) drops an
adapter from both caches; a request still running with it reloads it from its path.

Dimension legend: T tokens in the step, S slots (max_loras), R max_lora_rank.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from enginecore.config import EngineConfig
from enginecore.lora_adapter import inspect_lora_adapter, lora_module_shapes
from enginecore.protocol import LoRARef
from kernels.lora import fill_lora_tiles, max_lora_tiles
from workers.lora_layers import LORA_PACKED_TARGETS, LoRABatch, wrap_lora_layers
from workers.models import read_hf_config

logger = logging.getLogger("workers")


@dataclass
class LoRAAdapter:
    """One adapter in CPU memory: (A [r, in], scaled B [out, r]) per (layer, PEFT module)."""

    ref: LoRARef
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_lora_adapter(ref: LoRARef, max_rank: int, model_dir: str, dtype: torch.dtype,
                      pin: bool = False) -> LoRAAdapter:
    """Read and check a PEFT adapter directory; fold its scaling into B; cast to `dtype`."""
    info = inspect_lora_adapter(ref.path, max_rank, model_dir)
    tensors = load_file(str(Path(ref.path) / "adapter_model.safetensors"))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, (layer, module, kind, _) in info.tensors.items():
        halves.setdefault((layer, module), {})[kind] = tensors[key]
    weights = {}
    for (layer, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {ref.path!r}: layer {layer} {module} has only "
                             f"lora_{''.join(pair)}")
        a = pair["A"].to(dtype).contiguous()
        b = (pair["B"].double() * info.scaling).to(dtype).contiguous()
        weights[(layer, module)] = (a.pin_memory(), b.pin_memory()) if pin else (a, b)
    return LoRAAdapter(ref=ref, rank=info.rank, weights=weights)


class LoRAManager:
    """GPU slots and CPU cache of adapters, and the per-step token -> slot mapping."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype, max_tokens: int) -> None:
        lora = config.lora
        if config.parallel.tensor_parallel_size != 1:
            raise NotImplementedError("LoRA with tensor_parallel_size > 1 is not supported yet")
        self.model_dir = config.model.model
        self.device, self.dtype = device, dtype
        self.num_slots, self.max_rank = lora.max_loras, lora.max_lora_rank
        self.cpu_capacity = lora.cpu_capacity
        self.pin = device.type == "cuda"

        def pair(n: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
            host = torch.full((n,), -1, dtype=torch.int32, pin_memory=self.pin)
            return host.numpy(), host, torch.full((n,), -1, dtype=torch.int32, device=device)

        self._slots_np, self._slots_host, slots_dev = pair(max_tokens)
        self._ids_np, self._ids_host, ids_dev = pair(max_tokens)
        self._tiles_np, self._tiles_host, tiles_dev = pair(
            max_lora_tiles(max_tokens, self.num_slots) * 3)
        self._tiles_np = self._tiles_np.reshape(-1, 3)
        cuda = device.type == "cuda"
        self.batch = LoRABatch(token_slots=slots_dev, sorted_token_ids=ids_dev,
                               tiles=tiles_dev.view(-1, 3), active=cuda, kernels=cuda)
        shapes = lora_module_shapes(read_hf_config(self.model_dir))
        self.layers = wrap_lora_layers(model, shapes, self.num_slots, self.max_rank, self.batch,
                                       dtype)
        self.cpu_cache: collections.OrderedDict[int, LoRAAdapter] = collections.OrderedDict()
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU first
        self.slot_refs: list[LoRARef | None] = [None] * self.num_slots

    # ------------------------------------------------------------ per step

    def prepare(self, loras: list[LoRARef | None], num_scheduled: np.ndarray) -> list[int]:
        """Make the step's adapters resident; write the token -> slot mapping to the device.

        loras[i] is request i's adapter (None: base model), num_scheduled[i] its token count.
        Returns the indices of requests whose adapter failed to load (they run without one; the
        runner reports them failed so their tokens are never used).
        """
        in_use: set[int] = set()
        failed: list[int] = []
        req_slots = np.full(len(loras), -1, dtype=np.int32)
        for i, ref in enumerate(loras):
            if ref is not None:
                try:
                    req_slots[i] = self._activate(ref, in_use)
                except Exception as e:  # noqa: BLE001 - any failure: fail these requests only
                    # Checked in the API process, but the files may have changed since.
                    logger.error("LoRA adapter %r (%s) failed to load: %s", ref.name, ref.path, e)
                    failed.append(i)
        num_tokens = int(num_scheduled.sum())
        token_slots = np.repeat(req_slots, num_scheduled)
        self._slots_np[:num_tokens] = token_slots
        counts = np.bincount(token_slots[token_slots >= 0], minlength=self.num_slots)
        self.batch.num_tiles = fill_lora_tiles(np.concatenate([[0], np.cumsum(counts)]),
                                               self._tiles_np)
        if in_use:
            # A stable sort by slot; tokens without an adapter (-1) sort first and are cut off.
            order = np.argsort(token_slots, kind="stable")[num_tokens - int(counts.sum()):]
            self._ids_np[: len(order)] = order
        if self.device.type != "cuda":
            self.batch.active = bool(in_use)
        nb = self.pin
        self.batch.token_slots[:num_tokens].copy_(self._slots_host[:num_tokens], non_blocking=nb)
        self.batch.tiles.view(-1).copy_(self._tiles_host, non_blocking=nb)
        if in_use:
            n = int(counts.sum())
            self.batch.sorted_token_ids[:n].copy_(self._ids_host[:n], non_blocking=nb)
        return failed

    def clear(self) -> None:
        """Map no token to an adapter (before warm-up, profiling and graph-capture runs, whose
        tokens are not the last step's: stale tiles would index past their rows)."""
        self.batch.token_slots.fill_(-1)
        self.batch.tiles.fill_(-1)
        self.batch.num_tiles = 0
        self.batch.active = self.device.type == "cuda"

    def remove(self, int_id: int) -> None:
        """Forget an unloaded adapter (CPU cache and GPU slot)."""
        self.cpu_cache.pop(int_id, None)
        slot = self.slot_of.pop(int_id, None)
        if slot is not None:
            self.slot_refs[slot] = None

    # ------------------------------------------------------------ caches

    def _activate(self, ref: LoRARef, in_use: set[int]) -> int:
        """The GPU slot holding `ref`, loading it (evicting the least recently used) if needed."""
        slot = self.slot_of.get(ref.int_id)
        if slot is not None and self.slot_refs[slot] == ref:
            self.slot_of.move_to_end(ref.int_id)
            in_use.add(ref.int_id)
            return slot
        if slot is not None:  # same id, different adapter: a stale entry
            self.remove(ref.int_id)
        adapter = self._cpu_adapter(ref)
        free = [s for s, r in enumerate(self.slot_refs) if r is None]
        if free:
            slot = free[0]
        else:
            victim = next((i for i in self.slot_of if i not in in_use), None)
            if victim is None:
                raise RuntimeError(f"more than max_loras={self.num_slots} adapters in one step")
            slot = self.slot_of.pop(victim)
        self._write_slot(slot, adapter)
        self.slot_refs[slot] = ref
        self.slot_of[ref.int_id] = slot
        in_use.add(ref.int_id)
        return slot

    def _cpu_adapter(self, ref: LoRARef) -> LoRAAdapter:
        adapter = self.cpu_cache.get(ref.int_id)
        if adapter is not None and adapter.ref == ref:
            self.cpu_cache.move_to_end(ref.int_id)
            return adapter
        adapter = load_lora_adapter(ref, self.max_rank, self.model_dir, self.dtype, self.pin)
        logger.info("loaded LoRA adapter %r (id %d, rank %d) from %s", ref.name, ref.int_id,
                    adapter.rank, ref.path)
        self.cpu_cache[ref.int_id] = adapter
        while len(self.cpu_cache) > self.cpu_capacity:
            self.cpu_cache.popitem(last=False)  # GPU slots keep their own copy
        return adapter

    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for index, per_layer in enumerate(self.layers):
            for target, wrapper in per_layer.items():
                wrapper.set_slot(slot, [adapter.weights.get((index, name))
                                        for name in LORA_PACKED_TARGETS[target]])
