"""`PersistentBatch`: the worker's dense row order of live requests, and its `BatchUpdate`s.

Batch-level logits processors (`sampling/logits_processor.py`) keep per-row state indexed by a
request's position in this batch. The batch stays contiguous (indices 0..B-1) and changes only
as requests come and go, so a step usually costs nothing; each change is reported once.

Per step (vLLM's persistent-batch algorithm):
    1. finished requests leave holes;
    2. new requests fill the holes in increasing index order, the rest append at the end;
    3. holes nobody filled are `removed`, then condensed: the highest live row moves
       (UNIDIRECTIONAL) into the lowest hole until the batch is contiguous;
    4. reordering swaps (`swaps`, in indices after step 3) follow as SWAP moves.
No change at all -> None.
"""

from __future__ import annotations

from collections.abc import Sequence

from sampling.logits_processor import (
    AddedRequest,
    BatchUpdate,
    MoveDirectionality,
    MovedRequest,
)
from sampling.params import SamplingParams

# (req_id, params, prompt token ids, the live output token id list)
NewRow = tuple[str, SamplingParams, list[int], list[int]]


class PersistentBatch:
    def __init__(self) -> None:
        self.req_ids: list[str] = []  # index -> request, contiguous
        self.index: dict[str, int] = {}

    @property
    def batch_size(self) -> int:
        return len(self.req_ids)

    def update(self, finished: list[str], new: list[NewRow],
               swaps: Sequence[tuple[int, int]] = ()) -> BatchUpdate | None:
        """Apply one step's departures, arrivals and reordering swaps (indices after the
        departures and arrivals); the update describing them, or None."""
        holes = sorted(self.index.pop(r) for r in finished if r in self.index)
        if not holes and not new and not swaps:
            return None
        ids: list[str | None] = list(self.req_ids)
        for h in holes:
            ids[h] = None
        added: list[AddedRequest] = []
        fill = iter(holes)
        for req_id, params, prompt_ids, output_ids in new:
            slot = next(fill, None)
            if slot is None:
                slot = len(ids)
                ids.append(None)
            ids[slot] = req_id
            self.index[req_id] = slot
            added.append((slot, params, prompt_ids, output_ids))
        removed = list(fill)
        moved = self._condense(ids, removed)
        for a, b in swaps:
            rows = self.req_ids
            rows[a], rows[b] = rows[b], rows[a]
            self.index[rows[a]], self.index[rows[b]] = a, b
            moved.append((a, b, MoveDirectionality.SWAP))
        return BatchUpdate(batch_size=len(self.req_ids), removed=removed, added=added,
                           moved=moved)

    def _condense(self, ids: list[str | None], holes: list[int]) -> list[MovedRequest]:
        """Fill `holes` (ascending) from the highest live rows; store the contiguous result."""
        moved: list[MovedRequest] = []
        live = len(ids) - len(holes)
        for hole in holes:
            if hole >= live:
                break  # the remaining holes are in the tail that gets cut off
            src = len(ids) - 1
            while ids[src] is None:
                src -= 1
            ids[hole], ids[src] = ids[src], None
            self.index[ids[hole]] = hole  # type: ignore[index]
            moved.append((src, hole, MoveDirectionality.UNIDIRECTIONAL))
        del ids[live:]
        self.req_ids = ids  # type: ignore[assignment]
        return moved
