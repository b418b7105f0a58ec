"""`GrammarBitmask`: fills a step's structured-output bitmask on a background thread.

Why a thread: llguidance computes masks without the GIL, so the fill can run while the worker's
main thread is still launching the step's forward kernels (eager prefill steps are host-bound
for small models) and while the GPU runs them. The runner calls `start` right after staging the
step's inputs; the sampler calls `take` when it needs the mask, after the LM head is queued.
Tokens sampled in the previous step reach the matchers here too (`RequestGrammar.defer_tokens`),
so no grammar work sits between a step's host sync and the next step's launch.

Invariant: at most one fill is in flight, and `take` is called before the next `start`; the
pinned host buffer is reused only after the device copy that read it has finished.

Dimension legend: M constrained rows in the step, W = ceil(V / 32) int32 words per row.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from sampling.logits import to_device
from sampling.structured import RequestGrammar, fill_bitmasks


class GrammarBitmask:
    """One worker's bitmask filler: pinned host rows, a copy-done event, one fill thread."""

    def __init__(self, vocab_size: int, threaded: bool = True) -> None:
        self.words = -(-vocab_size // 32)
        # False: `take` fills on the calling thread (no hand-off; for measuring the thread's gain)
        self.threaded = threaded
        self._inline: tuple[list[RequestGrammar | None], torch.device] | None = None
        self._host: Tensor | None = None  # [rows, W] int32, pinned when the device is a GPU
        self._copied: torch.cuda.Event | None = None  # the last device copy out of `_host`
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[tuple[Tensor, list[int]] | None] | None = None

    @property
    def pending(self) -> bool:
        """True between `start` and `take`."""
        return self._job is not None or self._inline is not None

    def start(self, grammars: list[RequestGrammar | None], device: torch.device) -> None:
        """Begin filling the rows of `grammars` that are not None (row i = grammars[i])."""
        assert not self.pending, "take() the previous bitmask first"
        if not self.threaded:
            self._inline = (list(grammars), device)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-bitmask")
        self._job = self._pool.submit(self._fill, list(grammars), device)

    def take(self, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """(bitmask [M, W] int32, row indices [M] int64) on `device`; None: no row constrained."""
        job, self._job = self._job, None
        inline, self._inline = self._inline, None
        assert job is not None or inline is not None, "start() first"
        filled = job.result() if job is not None else self._fill(*inline)
        if filled is None:
            return None
        host, rows = filled
        bitmask = host.to(device, non_blocking=True)
        if device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return bitmask, to_device(rows, torch.int64, device)

    def _fill(self, grammars: list[RequestGrammar | None],
              device: torch.device) -> tuple[Tensor, list[int]] | None:
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        host = self._host
        if host is None or host.shape[0] < len(rows):
            host = torch.empty((max(len(rows), 16), self.words), dtype=torch.int32,
                               pin_memory=device.type == "cuda")
            self._host = host
        elif self._copied is not None:
            self._copied.synchronize()  # the last step's copy out of `host` is done
        host = host[: len(rows)]
        fill_bitmasks([g for g in grammars if g is not None], host.numpy())
        return host, rows

    def shutdown(self) -> None:
        """Stop the fill thread (a running fill finishes first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
