"""`GrammarBitmask`: fills a step's structured-output bitmask while the GPU runs the forward.

The sampler calls `fill` after the runner has queued the step's forward and LM head, and nothing
between that launch and the fill waits for the GPU (the runner's index copies are pinned and
non-blocking), so the host's grammar work runs while the GPU computes the step: it adds to the
step only where it outlasts the forward. Tokens sampled in the previous step reach the matchers
here too (`RequestGrammar.defer_tokens`), so no grammar work sits between a step's host sync and
the next step's launch.

Why not a helper thread: measured on an H100 host (bs 64, half the rows constrained), a fill
handed to a thread cost 0.8 ms a step more than the same fill done here, in GIL hand-offs
between the thread's Python (advancing 32 matchers) and the launching thread.

Invariant: the pinned host buffer is rewritten only after the device copy that last read it
has finished (an event recorded behind that copy).

Dimension legend: M constrained rows in the step, W = ceil(V / 32) int32 words per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sampling.logits import to_device
from sampling.structured import RequestGrammar, fill_bitmasks


class GrammarBitmask:
    """One worker's bitmask filler: pinned host rows reused across steps, a copy-done event."""

    def __init__(self, vocab_size: int) -> None:
        self.words = -(-vocab_size // 32)
        self._host: Tensor | None = None  # [rows, W] int32, pinned when the device is a GPU
        self._copied: torch.cuda.Event | None = None  # the last device copy out of `_host`

    def fill(self, grammars: list[RequestGrammar | None],
             device: torch.device) -> tuple[Tensor, Tensor] | None:
        """(bitmask [M, W] int32, row indices [M] int64) on `device` for the rows of `grammars`
        that are not None (row i = grammars[i]); None: no row is constrained."""
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
        bitmask = host.to(device, non_blocking=True)
        if device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return bitmask, to_device(rows, torch.int64, device)
