"""Paged KV-cache bookkeeping: which blocks each request owns, and the prefix cache.

Torch-free: the workers own the KV memory, shaped [num_blocks, block_size, ...] per layer; this
module only decides which block ids a request's tokens go to. Token t of a request lives in
block `block_ids[t // block_size]`, slot `t % block_size`.

Block 0 is the null block: never handed to a request and never freed, so workers may point the
padding rows of block tables and slot mappings at it (CUDA-graph padding, ...) without clobbering
live KV. Usable blocks are therefore 1 .. num_blocks-1.

Prefix caching. Each FULL block of a request's tokens has a chained hash

    hash(block i) = sha256(msgpack([hash(block i-1) or b"", token ids of block i, extra keys]))

so equal hashes mean equal whole prefixes. Once a block's tokens are computed its hash is
registered (`cache_full_blocks`); a later request whose prefix hashes match reuses the block
(`get_computed_blocks`) and starts with those tokens already computed. A freed block keeps its
hash and stays findable until it is evicted: it sits in an LRU free list and eviction takes the
least recently freed block, dropping its hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import msgspec

from enginecore.request import Request

_hash_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int],
                      extra_keys: tuple[str | int, ...] = ()) -> bytes:
    """Chained sha256 of one full block (32 bytes)."""
    payload = _hash_encoder.encode((parent_hash or b"", token_ids, extra_keys))
    return hashlib.sha256(payload).digest()


class Block:
    """One KV block: id, reference count, prefix-cache hash, free-list links."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None  # set only while registered in BlockPool.cached
        self.prev: Block | None = None  # free-list neighbours; None while in use
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    """Blocks with ref counts, an LRU free list and the hash -> block prefix-cache map.

    The free list is intrusive and doubly linked (links live in the blocks, around a sentinel)
    rather than a deque: a prefix hit on a free cached block must take it out of the middle of the
    list, which is O(1) here and O(n) with `deque.remove`.

        sentinel <-> [evicted first ... evicted last] <-> sentinel
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is the null block), got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # pinned: never allocated, never freed
        self.cached: dict[bytes, Block] = {}
        self._sentinel = Block(-1)
        self._sentinel.prev = self._sentinel.next = self._sentinel
        self.num_free_blocks = 0
        for block in self.blocks[1:]:
            self._link_before(block, self._sentinel)

    @property
    def num_usable_blocks(self) -> int:
        """All blocks but the null block."""
        return len(self.blocks) - 1

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def allocate(self, num_blocks: int) -> list[Block]:
        """Take `num_blocks` from the LRU end of the free list, evicting their cached hashes."""
        assert num_blocks <= self.num_free_blocks, (num_blocks, self.num_free_blocks)
        out = []
        for _ in range(num_blocks):
            block = self._sentinel.next
            assert block is not None and block is not self._sentinel
            self._unlink(block)
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-hit blocks, pulling free ones out of the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._unlink(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference per block; blocks reaching 0 join the free list in the given order."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, block
            if block.ref_cnt:
                continue
            if block.block_hash is None:
                # Holds nothing reusable: put it first in line so cached blocks live longer.
                self._link_before(block, self._sentinel.next)
            else:
                self._link_before(block, self._sentinel)

    def lookup(self, block_hash: bytes) -> Block | None:
        """The cached block with this hash, in use or free, if any."""
        return self.cached.get(block_hash)

    def register(self, block: Block, block_hash: bytes) -> None:
        """Make a computed full block findable by its hash (the first block with a hash wins)."""
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def reset(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        return True

    def _unlink(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, block
        block.prev.next = block.next
        block.next.prev = block.prev
        block.prev = block.next = None
        self.num_free_blocks -= 1

    def _link_before(self, block: Block, anchor: Block) -> None:
        prev = anchor.prev
        assert prev is not None
        block.prev, block.next = prev, anchor
        prev.next = block
        anchor.prev = block
        self.num_free_blocks += 1


class KVCacheManager:
    """Per-request block tables over a `BlockPool`, with prefix-cache lookup and registration."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[Block]] = {}
        # How many leading blocks of each request are already registered in the pool.
        self._num_registered: dict[str, int] = {}
        self.prefix_cache_queries = 0  # cumulative tokens looked up
        self.prefix_cache_hits = 0  # cumulative tokens found

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of full blocks, in blocks and tokens (never the whole prompt)."""
        if not self.may_look_up(request):
            return [], 0
        # At least the last token must be computed: the model samples from its logits.
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_hit_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[Block] = (),
                       num_lookahead_tokens: int = 0) -> list[int] | None:
        """Grow `request`'s block table to hold `num_new_tokens` more; new block ids or None.

        Returns None, allocating nothing, when too few blocks are free. `computed_blocks` are the
        prefix hits from `get_computed_blocks`, passed on the request's first allocation only
        (before the scheduler moves num_computed_tokens past them); they head its table, shared.

            tokens | computed: hit + earlier steps | new: scheduled now | lookahead (spec) |
            blocks [ b0    ][ b1    ][ b2    ][ b3    ][ b4    ][ b5    ][ b6    ]
                   |<--- held / hit ---------->|<---- taken from the free list now ---->|
                   ceil((computed + new + lookahead) / block_size) blocks in all
        """
        blocks = self.req_blocks.get(request.request_id, [])
        assert not (blocks and computed_blocks), "prefix hits only on the first allocation"
        num_hit_tokens = len(computed_blocks) * self.block_size
        total = request.num_computed_tokens + num_hit_tokens + num_new_tokens + num_lookahead_tokens
        num_required = -(-total // self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(computed_blocks))
        # Free hit blocks leave the free list when touched: they cannot also be fresh blocks.
        num_free_hits = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_free_hits:
            return None
        if request.request_id not in self.req_blocks:
            self._record_lookup(request, num_hit_tokens)
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        self.req_blocks[request.request_id] = [*blocks, *computed_blocks, *new_blocks]
        if computed_blocks:
            self._num_registered[request.request_id] = len(computed_blocks)
        return [block.block_id for block in new_blocks]

    def block_ids(self, request_id: str) -> list[int]:
        """The whole block table of a request (empty if it holds none)."""
        return [block.block_id for block in self.req_blocks.get(request_id, ())]

    def free(self, request: Request) -> None:
        """Release a request's blocks; its last blocks become the first to be evicted."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if blocks:
            # Reversed: a prefix's head is shared by more future requests than its tail.
            self.pool.free(reversed(blocks))

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the blocks filled by the first `num_computed_tokens` tokens.

        The caller passes the count a step result confirms: with async scheduling
        `request.num_computed_tokens` also counts tokens of steps still in flight, whose KV is
        not written yet and must not be offered to other requests.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request.request_id)
        if blocks is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        self._hash_full_blocks(request, num_full)
        for i in range(start, num_full):
            self.pool.register(blocks[i], request.block_hashes[i])
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only possible (True) when no block is in use."""
        return self.pool.reset()

    def may_look_up(self, request: Request) -> bool:
        """Whether prefix-cache hits may skip computing `request`'s leading blocks."""
        # Prompt logprobs need logits at every prompt position, so nothing may be skipped.
        return self.enable_prefix_caching and request.sampling.prompt_logprobs is None

    def _record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        # Counted on a successful first allocation, so a request retried over several steps
        # while blocks are short is counted once.
        if self.may_look_up(request):
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The hashes of `request`'s first `num_blocks` blocks (all full)."""
        self._hash_full_blocks(request, num_blocks)
        return request.block_hashes[:num_blocks]

    def _hash_full_blocks(self, request: Request, num_blocks: int) -> None:
        """Extend request.block_hashes to its first `num_blocks` blocks (all must be full)."""
        hashes, tokens, size = request.block_hashes, request.all_token_ids, self.block_size
        assert num_blocks * size <= len(tokens)
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block_tokens(parent, tokens[i * size:(i + 1) * size],
                                            request.block_extra_keys(i, size)))
