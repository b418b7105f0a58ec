"""KVCacheManager / BlockPool: allocation, ref counts, LRU eviction, prefix hashing and hits."""

from __future__ import annotations

import pytest

from enginecore.kv_cache import BlockPool, KVCacheManager, hash_block_tokens
from enginecore.protocol import AddRequest
from enginecore.request import Request
from sampling.params import SamplingParams

BLOCK = 4


def make_request(req_id: str, prompt: list[int], salt: str | None = None,
                 **sampling: object) -> Request:
    return Request(AddRequest(req_id, prompt, SamplingParams(**sampling), cache_salt=salt))


def compute_all(kv: KVCacheManager, request: Request) -> list[int]:
    """Allocate for the whole prompt and mark it computed (one full prefill)."""
    new_ids = kv.allocate_slots(request, request.num_tokens)
    assert new_ids is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request, request.num_tokens)
    return new_ids


def test_alloc_free_ref_counts_and_usage():
    kv = KVCacheManager(num_blocks=9, block_size=BLOCK, enable_prefix_caching=False)
    assert kv.num_total_blocks == 8  # block 0 is the null block
    req = make_request("a", list(range(10)))
    ids = kv.allocate_slots(req, 10)
    assert ids is not None and len(ids) == 3 and 0 not in ids
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)
    assert all(kv.pool.blocks[i].ref_cnt == 1 for i in ids)
    # Growing within the last block needs nothing; crossing a boundary needs one more.
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 2) == []
    grown = kv.allocate_slots(req, 3)
    assert grown is not None and len(grown) == 1
    assert kv.block_ids("a") == ids + grown
    kv.free(req)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    assert all(kv.pool.blocks[i].ref_cnt == 0 for i in ids + grown)
    assert kv.pool.null_block.ref_cnt == 1


def test_allocate_returns_none_and_takes_nothing_when_short():
    kv = KVCacheManager(num_blocks=5, block_size=BLOCK, enable_prefix_caching=False)
    big = make_request("big", list(range(12)))
    assert kv.allocate_slots(big, 12) is not None
    other = make_request("other", list(range(8)))
    assert kv.allocate_slots(other, 8) is None
    assert kv.num_free_blocks == 1 and kv.block_ids("other") == []
    # Lookahead slots count too.
    assert kv.allocate_slots(other, 4, num_lookahead_tokens=1) is None
    assert kv.allocate_slots(other, 4) is not None
    kv.free(big)
    kv.free(other)
    assert kv.usage == 0.0


def test_lru_eviction_order():
    pool = BlockPool(6)
    blocks = pool.allocate(5)
    assert [b.block_id for b in blocks] == [1, 2, 3, 4, 5]
    for i, block in enumerate(blocks[:4]):
        pool.register(block, bytes([i]))
    # Freed in this order; block 5 holds no hash so it goes first in line regardless.
    pool.free([blocks[2], blocks[0], blocks[4], blocks[3], blocks[1]])
    assert pool.num_free_blocks == 5
    # A hit on a free cached block takes it out of the middle of the list.
    hit = pool.lookup(bytes([3]))
    assert hit is blocks[3]
    pool.touch([hit])
    assert pool.num_free_blocks == 4 and hit.ref_cnt == 1
    evicted = pool.allocate(3)
    assert [b.block_id for b in evicted] == [5, 3, 1]
    # Eviction dropped the hashes of the cached ones; untouched ones stay findable.
    assert pool.lookup(bytes([2])) is None and pool.lookup(bytes([0])) is None
    assert pool.lookup(bytes([1])) is blocks[1] and pool.lookup(bytes([3])) is blocks[3]
    pool.free(evicted + [hit])
    assert pool.num_free_blocks == 5


def test_duplicate_blocks_register_once():
    # Two requests can compute the same prefix in the same step (neither hit): first one wins.
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    pool.register(first, b"h")
    pool.register(second, b"h")
    assert pool.lookup(b"h") is first and second.block_hash is None
    pool.free([second, first])
    assert [b.block_id for b in pool.allocate(2)] == [second.block_id, 3]
    assert pool.lookup(b"h") is first


def test_free_evicts_a_requests_tail_first():
    kv = KVCacheManager(num_blocks=5, block_size=BLOCK, enable_prefix_caching=True)
    req = make_request("a", list(range(16)))
    ids = compute_all(kv, req)
    kv.free(req)
    evicted = kv.pool.allocate(4)
    assert [b.block_id for b in evicted] == ids[::-1]
    kv.pool.free(evicted)


def test_hash_chaining_and_salt():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    shared = list(range(100, 108))
    a = make_request("a", shared + [1, 2, 3, 4, 5])
    b = make_request("b", shared + [9, 9, 9, 9, 5])
    salted = make_request("s", shared + [1, 2, 3, 4, 5], salt="tenant-1")
    salted2 = make_request("s2", shared + [1, 2, 3, 4, 5], salt="tenant-2")
    for req in (a, b, salted, salted2):
        kv._hash_full_blocks(req, 3)
    assert a.block_hashes[:2] == b.block_hashes[:2]
    assert a.block_hashes[2] != b.block_hashes[2]
    # The salt is mixed into block 0 only, but chaining carries it to every block.
    for req in (salted, salted2):
        assert all(h1 != h2 for h1, h2 in zip(a.block_hashes, req.block_hashes, strict=True))
    assert all(h1 != h2 for h1, h2 in zip(salted.block_hashes, salted2.block_hashes, strict=True))
    assert a.block_hashes[1] == hash_block_tokens(a.block_hashes[0], shared[4:8])
    # Same tokens under a different parent hash differ.
    assert hash_block_tokens(None, shared[4:8]) != a.block_hashes[1]


def test_prefix_hit_capped_below_the_whole_prompt():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("first", list(range(8)))
    compute_all(kv, first)
    # An identical 8-token prompt may reuse only the first block: its last token must be run.
    same = make_request("same", list(range(8)))
    blocks, num_hit = kv.get_computed_blocks(same)
    assert num_hit == 4 and [b.block_id for b in blocks] == kv.block_ids("first")[:1]
    longer = make_request("longer", list(range(9)))
    blocks, num_hit = kv.get_computed_blocks(longer)
    assert num_hit == 8 and [b.block_id for b in blocks] == kv.block_ids("first")
    # The hit is shared, not copied: ref counts go to 2 and only the tail is new.
    new_ids = kv.allocate_slots(longer, 1, computed_blocks=blocks)
    assert new_ids is not None and len(new_ids) == 1
    assert kv.block_ids("longer") == kv.block_ids("first") + new_ids
    assert all(b.ref_cnt == 2 for b in blocks)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (8 + 9, 8)
    kv.free(first)
    assert kv.num_free_blocks == 15 - 3
    kv.free(longer)
    assert kv.usage == 0.0


def test_free_cached_blocks_are_reused_and_counted_once():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("first", list(range(9)))
    compute_all(kv, first)
    kv.free(first)
    again = make_request("again", list(range(9)))
    blocks, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 8
    # Hit blocks are free: they cannot double as the fresh block, so 3 blocks suffice exactly.
    assert kv.allocate_slots(again, 1, computed_blocks=blocks) is not None
    assert kv.num_free_blocks == 0
    kv.free(again)
    assert kv.usage == 0.0
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (18, 8)


def test_hit_blocks_not_double_counted_as_free():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("first", list(range(9)))
    compute_all(kv, first)
    kv.free(first)
    # 13 tokens: 2 hit blocks (free) + 2 new blocks > 3 usable: must fail and leave the hits free.
    longer = make_request("longer", list(range(13)))
    blocks, num_hit = kv.get_computed_blocks(longer)
    assert num_hit == 8
    assert kv.allocate_slots(longer, 5, computed_blocks=blocks) is None
    assert kv.num_free_blocks == 3 and all(b.ref_cnt == 0 for b in blocks)
    assert kv.get_computed_blocks(make_request("x", list(range(9))))[1] == 8


def test_prompt_logprobs_skip_lookup_but_register():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    plp = make_request("plp", list(range(9)), prompt_logprobs=1)
    compute_all(kv, plp)
    again = make_request("plp2", list(range(9)), prompt_logprobs=0)
    assert kv.get_computed_blocks(again) == ([], 0)
    assert kv.get_computed_blocks(make_request("plain", list(range(9))))[1] == 8
    assert kv.prefix_cache_queries == 0
    kv.free(plp)


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=False)
    first = make_request("first", list(range(9)))
    compute_all(kv, first)
    assert kv.get_computed_blocks(make_request("again", list(range(9)))) == ([], 0)
    assert not kv.pool.cached
    kv.free(first)


def test_cache_full_blocks_registers_only_computed_full_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 6) is not None
    req.num_computed_tokens = 6  # a partial prefill chunk: one full block
    kv.cache_full_blocks(req, 6)
    assert len(kv.pool.cached) == 1
    assert kv.allocate_slots(req, 4) is not None
    req.num_computed_tokens = 10
    kv.cache_full_blocks(req, 10)
    assert len(kv.pool.cached) == 2 and len(req.block_hashes) == 2
    kv.free(req)


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    req = make_request("a", list(range(9)))
    compute_all(kv, req)
    assert kv.reset_prefix_cache() is False  # blocks in use
    assert kv.get_computed_blocks(make_request("b", list(range(9))))[1] == 8
    kv.free(req)
    assert kv.reset_prefix_cache() is True
    assert not kv.pool.cached
    assert all(b.block_hash is None for b in kv.pool.blocks)
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([], 0)
    assert kv.usage == 0.0
