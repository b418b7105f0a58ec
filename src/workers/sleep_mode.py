"""`SleepMode`: release a worker's device memory on demand and take it back (`--enable-sleep-mode`).

Two parts, woken separately (tags as in vLLM):
    "weights"   level 1: every parameter is copied to host memory (pinned on CUDA) and its device
                storage freed; level 2: freed without a copy (only shapes and dtypes are kept),
                so the weights must be reloaded (`ReloadWeights`) after waking. Buffers (rotary
                tables) are small and always kept on the host.
    "kv_cache"  freed at either level; its contents are gone (the engine core resets the prefix
                cache), and it comes back zeroed with the same number of blocks.
CUDA graphs hold the addresses of both, so they are dropped on sleep and captured again once
every part is awake. Parameters keep their identity (only `.data` is swapped), so the model and
its weight loaders work unchanged after waking.
"""

from __future__ import annotations

import torch

from enginecore.protocol import SLEEP_TAGS


class SleepMode:
    def __init__(self, runner) -> None:  # runner: workers.runner.ModelRunner
        self.runner = runner
        self.asleep: set[str] = set()
        self.level = 0
        # name -> host copy (level 1) or an empty tensor of the right shape/dtype (level 2)
        self._weights: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._num_blocks = 0

    def sleep(self, level: int) -> None:
        """Offload (level 1) or discard (level 2) the weights; discard the KV cache."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.asleep:
            raise RuntimeError(f"already asleep ({sorted(self.asleep)} not woken)")
        runner, model = self.runner, self.runner.model
        runner.graphs = []
        if runner.spec is not None:
            runner.spec.drop_graphs()
        self._num_blocks = runner.num_blocks
        runner.kv_caches = []
        empty = torch.empty(model.kv_cache_shape(0, runner.block_size), dtype=runner.dtype,
                            device=runner.device)
        model.bind_kv_cache([empty] * model.num_layers)
        pin = runner.device.type == "cuda"
        for name, param in model.named_parameters():
            if level == 1 and pin:  # one device -> pinned host copy
                host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
                self._weights[name] = host.copy_(param.data)
            elif level == 1:  # CPU runs: "offloading" keeps the tensor itself
                self._weights[name] = param.data
            else:
                self._weights[name] = torch.empty(param.shape, dtype=param.dtype, device="meta")
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        for name, buf in model.named_buffers():
            self._buffers[name] = buf.data.to("cpu", copy=pin)
            buf.data = torch.empty(0, dtype=buf.dtype, device=buf.device)
        self.asleep = set(SLEEP_TAGS)
        self.level = level
        if pin:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def wake_up(self, tags: list[str]) -> None:
        """Bring back the named parts (weights stay garbage after a level-2 sleep until reload)."""
        unknown = set(tags) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"tags: unknown {sorted(unknown)}; expected a subset of {SLEEP_TAGS}")
        runner, model = self.runner, self.runner.model
        if "weights" in tags and "weights" in self.asleep:
            params = dict(model.named_parameters())
            for name, saved in self._weights.items():
                if saved.is_meta:  # level 2: fresh storage, to be overwritten by a reload
                    params[name].data = torch.zeros(saved.shape, dtype=saved.dtype,
                                                    device=runner.device)
                else:
                    params[name].data = saved.to(runner.device, non_blocking=True)
            buffers = dict(model.named_buffers())
            for name, saved in self._buffers.items():
                buffers[name].data = saved.to(runner.device)
            self._weights.clear()
            self._buffers.clear()
            self.asleep.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.asleep:
            self.asleep.discard("kv_cache")
            runner.init_kv_cache(self._num_blocks, capture=not self.asleep)
        elif "weights" in tags and not self.asleep:
            runner.capture_graphs()  # the KV cache woke first
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
