"""`EncoderCacheManager`: which multimodal encoder outputs the workers hold, and for whom.

The workers keep each encoded item's embeddings ([length, hidden], keyed by the item's content
hash) from the step that encodes it until the engine core says to drop them. This class is the
core's mirror of that cache: a capacity in tokens (embedding rows), a reference set per hash (the
running requests whose not-yet-computed placeholders still need it), and the hashes freed since
the last step, which the next `ExecuteStep` tells the workers to drop before they encode anything.

Lifetime of one item's entry:

    schedule(N): a request's scheduled range reaches the item's placeholders
        cached?  yes -> take a reference;  no -> allocate (capacity) + encode in step N
    schedule(N+k) start: the request's num_computed_tokens passed the item's end -> release
    finish / abort / preemption -> release all of the request's references
    last reference released -> entry freed; its hash goes out with the next step

Frees only ever ride on a step sent after every step that used the entry (steps run in order), so
a worker never drops embeddings a queued step still reads. An entry freed and needed again later
is simply encoded again.

Encoder budget: items encoded per step are capped at `max_num_encoder_input_tokens` placeholder
tokens. A request whose range reaches an item that does not fit (budget or capacity) is cut just
before the item and continues next step.
"""

from __future__ import annotations

from enginecore.request import Request


class EncoderCacheManager:
    """Capacity, references and frees of the workers' encoder-output cache."""

    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self.num_free = cache_size
        self.refs: dict[str, set[str]] = {}  # hash -> ids of requests that need it
        self.sizes: dict[str, int] = {}  # hash -> rows it takes
        self._freed: list[str] = []

    def plan(self, request: Request, start: int, num_new: int, budget: int,
             encoding: set[str]) -> tuple[int, list[int]]:
        """Cut [start, start + num_new) before the first item that cannot be encoded now.

        Returns (tokens that may be scheduled, indices of items to encode this step). `budget`
        is what is left of this step's encoder budget; `encoding` the hashes already being
        encoded this step (reused, not encoded twice). Changes nothing: `commit` does.
        """
        to_encode: list[int] = []
        end = start + num_new
        free = self.num_free
        planned: set[str] = set()
        for i, item in enumerate(request.mm_inputs):
            if item.offset + item.length <= start or item.offset >= end:
                continue  # not touched by this step's range
            if item.hash in self.refs or item.hash in encoding or item.hash in planned:
                continue
            if item.length > budget or item.length > free:
                return max(0, item.offset - start), to_encode
            budget -= item.length
            free -= item.length
            planned.add(item.hash)
            to_encode.append(i)
        return num_new, to_encode

    def commit(self, request: Request, start: int, num_new: int, to_encode: list[int]) -> None:
        """Reference every item [start, start + num_new) touches; allocate those to encode."""
        for i, item in enumerate(request.mm_inputs):
            if item.offset + item.length <= start or item.offset >= start + num_new:
                continue
            if i in to_encode and item.hash not in self.refs:
                self.refs[item.hash] = set()
                self.sizes[item.hash] = item.length
                self.num_free -= item.length
            if item.hash in self.refs:
                self.refs[item.hash].add(request.request_id)
                request.encoder_refs.add(i)

    def release_done(self, request: Request) -> None:
        """Drop the references of items whose placeholders are all computed (or in flight)."""
        for i in list(request.encoder_refs):
            item = request.mm_inputs[i]
            if item.offset + item.length <= request.num_computed_tokens:
                self._release(request, i)

    def release_all(self, request: Request) -> None:
        """Drop every reference of a request that finished or was preempted."""
        for i in list(request.encoder_refs):
            self._release(request, i)

    def take_freed(self) -> list[str]:
        """Hashes freed since the last call (the workers drop them next step)."""
        freed, self._freed = self._freed, []
        return freed

    def _release(self, request: Request, index: int) -> None:
        request.encoder_refs.discard(index)
        key = request.mm_inputs[index].hash
        if any(request.mm_inputs[i].hash == key for i in request.encoder_refs):
            return  # the same media appears again later in this prompt: still needed
        holders = self.refs.get(key)
        if holders is None:
            return
        holders.discard(request.request_id)
        if not holders:
            del self.refs[key]
            self.num_free += self.sizes.pop(key)
            self._freed.append(key)
