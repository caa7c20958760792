"""BlockPool: reference counts, chained block hashes, prefix-cache hits and LRU eviction."""

from __future__ import annotations

import pytest

from streamvlm.contract.sampling import SamplingParams
from streamvlm.contract.block_hash import hash_block
from workers.kv_cache import BlockPool
from workers.sequence import Sequence

BS = 4


def make_seq(tokens, request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), [2], 0)


def compute(pool: BlockPool, seq: Sequence, num_tokens: int | None = None) -> None:
    """What a step does after the model ran: mark tokens computed, register full blocks."""
    seq.num_computed_tokens = seq.num_tokens if num_tokens is None else num_tokens
    pool.register_full_blocks(seq)


def prefill(pool: BlockPool, seq: Sequence) -> None:
    """Admit seq with its prefix-cache hits and compute its whole prompt."""
    hits = pool.find_cached_prefix(seq)
    assert pool.allocate(seq, seq.num_tokens - len(hits) * BS, hits)
    compute(pool, seq)


def snapshot(pool: BlockPool) -> tuple:
    return (list(pool.ref_counts), list(pool.free), dict(pool.cached), list(pool.block_hash))


def assert_consistent(pool: BlockPool) -> None:
    """Free blocks are exactly those with ref count 0; the index and block hashes agree."""
    assert set(pool.free) == {b for b, r in enumerate(pool.ref_counts) if r == 0}
    assert all(r >= 0 for r in pool.ref_counts)
    assert {h: b for b, h in enumerate(pool.block_hash) if h is not None} == pool.cached


# --- allocation and reference counts ------------------------------------------------------------

def test_allocate_grows_block_table_and_ref_counts():
    pool = BlockPool(8, BS, enable_prefix_caching=True)
    seq = make_seq(range(10))
    assert pool.blocks_needed(seq, 10) == 3
    assert pool.allocate(seq, 10)
    assert seq.block_table == [0, 1, 2]
    assert pool.ref_counts == [1, 1, 1, 0, 0, 0, 0, 0]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 3
    compute(pool, seq)

    # Decoding within the last block needs no new block; crossing into the next one does.
    seq.append_token(100, None)
    assert pool.allocate(seq, 1) and len(seq.block_table) == 3
    compute(pool, seq)
    seq.append_token(101, None)
    assert pool.allocate(seq, 1) and len(seq.block_table) == 3
    compute(pool, seq)
    seq.append_token(102, None)
    assert pool.allocate(seq, 1)
    assert seq.block_table == [0, 1, 2, 3] and pool.num_free_blocks == 4
    assert_consistent(pool)

    pool.free_sequence(seq)
    assert seq.block_table == [] and seq.num_registered_blocks == 0
    assert pool.ref_counts == [0] * 8 and pool.num_free_blocks == 8
    assert_consistent(pool)


def test_shared_prefix_blocks_are_ref_counted():
    pool = BlockPool(8, BS, enable_prefix_caching=True)
    first = make_seq(range(9), "a")
    prefill(pool, first)
    assert first.block_table == [0, 1, 2]
    second = make_seq(list(range(8)) + [50, 51], "b")
    prefill(pool, second)
    assert second.block_table[:2] == [0, 1] and second.block_table[2] not in first.block_table
    assert pool.ref_counts[:2] == [2, 2]
    assert second.num_computed_tokens == 10 and second.num_cached_tokens == 8

    pool.free_sequence(first)
    assert pool.ref_counts[:3] == [1, 1, 0]
    assert 0 not in pool.free and 1 not in pool.free and 2 in pool.free
    pool.free_sequence(second)
    assert pool.ref_counts == [0] * 8
    assert_consistent(pool)


# --- block hashes -------------------------------------------------------------------------------

def test_hash_block_is_deterministic_and_chained():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert h1 == hash_block(None, (1, 2, 3, 4)) and isinstance(h1, bytes)
    assert h1 != hash_block(None, [1, 2, 3, 5])
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]),
                                                      [5, 6, 7, 8])
    # Extra keys (e.g. image hashes) change the hash; equal keys give equal hashes.
    assert hash_block(h1, [5, 6, 7, 8], ("img", "abc")) != hash_block(h1, [5, 6, 7, 8])
    assert hash_block(h1, [5, 6, 7, 8], ("img", "abc")) != hash_block(h1, [5, 6, 7, 8],
                                                                      ("img", "abd"))
    assert hash_block(h1, [5, 6, 7, 8], ("img", "abc")) == hash_block(h1, [5, 6, 7, 8],
                                                                      ("img", "abc"))


def test_sequence_block_hashes_chain():
    pool = BlockPool(16, BS, enable_prefix_caching=True)
    a = make_seq(range(13), "a")
    b = make_seq(range(13), "b")
    c = make_seq([99] + list(range(1, 13)), "c")   # differs in the first block only
    for seq in (a, b, c):
        pool.find_cached_prefix(seq)   # computes the hashes of the full blocks before the last token
        assert len(seq.block_hashes) == 3
    assert a.block_hashes == b.block_hashes
    assert a.block_hashes[0] == hash_block(None, [0, 1, 2, 3])
    assert a.block_hashes[1] == hash_block(a.block_hashes[0], [4, 5, 6, 7])
    # Same tokens in blocks 1 and 2, yet every hash differs: the first block is in the chain.
    assert all(x != y for x, y in zip(a.block_hashes, c.block_hashes))


class ImageSequence(Sequence):
    """A sequence whose blocks hold the tokens of an image, identified by its hash."""

    def __init__(self, tokens, image_hash: str, request_id: str = "img") -> None:
        super().__init__(request_id, list(tokens), SamplingParams(), [2], 0)
        self.image_hash = image_hash

    def block_extra_keys(self, start: int, end: int) -> tuple:
        return (self.image_hash,) if start == BS else ()


def test_extra_keys_change_block_hashes_and_prevent_false_hits():
    pool = BlockPool(16, BS, enable_prefix_caching=True)
    cat = ImageSequence(range(13), "cat")
    prefill(pool, cat)
    cat_blocks = list(cat.block_table)
    pool.free_sequence(cat)
    dog = ImageSequence(range(13), "dog")
    assert dog.block_hashes == []
    hits = pool.find_cached_prefix(dog)
    assert dog.block_hashes[0] == cat.block_hashes[0]
    assert dog.block_hashes[1:] != cat.block_hashes[1:]
    assert hits == cat_blocks[:1]   # same tokens, but another image in block 1
    same = ImageSequence(range(13), "cat")
    assert pool.find_cached_prefix(same) == cat_blocks[:3]


# --- prefix-cache hits --------------------------------------------------------------------------

def test_prefix_hit_after_register_and_free():
    pool = BlockPool(8, BS, enable_prefix_caching=True)
    first = make_seq(range(12), "a")
    prefill(pool, first)
    blocks = list(first.block_table)
    assert len(pool.cached) == 3 and first.num_registered_blocks == 3
    pool.free_sequence(first)
    # Freed, but still findable: ref count 0, hash kept, in the free list.
    assert all(pool.ref_counts[b] == 0 and b in pool.free for b in blocks)
    assert all(pool.block_hash[b] is not None for b in blocks)

    second = make_seq(list(range(12)) + [77], "b")
    hits = pool.find_cached_prefix(second)
    assert hits == blocks
    assert pool.allocate(second, 1, hits)
    assert second.block_table[:3] == blocks and second.block_table[3] not in blocks
    assert all(pool.ref_counts[b] == 1 and b not in pool.free for b in blocks)
    assert second.num_computed_tokens == 12 and second.num_cached_tokens == 12
    assert second.num_registered_blocks == 3
    assert pool.num_free_blocks == 4
    assert_consistent(pool)


def test_prefix_never_covers_the_last_token():
    pool = BlockPool(8, BS, enable_prefix_caching=True)
    first = make_seq(range(12), "a")
    prefill(pool, first)
    pool.free_sequence(first)
    # Exactly 3 blocks long: only 2 can hit, the last token must be computed to get logits.
    again = make_seq(range(12), "b")
    hits = pool.find_cached_prefix(again)
    assert hits == [0, 1]
    assert pool.allocate(again, 12 - 2 * BS, hits)
    assert again.num_computed_tokens == 8 and again.num_uncomputed_tokens == 4
    assert again.block_table[:2] == [0, 1] and again.block_table[2] != 2
    compute(pool, again)
    # The recomputed last block is identical to the cached one: the index keeps the old entry.
    assert pool.cached[again.block_hashes[2]] == 2
    assert pool.block_hash[again.block_table[2]] is None
    assert_consistent(pool)
    # One token more than 3 blocks: all 3 hit.
    assert pool.find_cached_prefix(make_seq(range(13), "c")) == [0, 1, 2]
    # Shorter than one block plus a token: nothing to hit.
    assert pool.find_cached_prefix(make_seq(range(4), "d")) == []


def test_prefix_stops_at_first_miss():
    pool = BlockPool(8, BS, enable_prefix_caching=True)
    prefill(pool, make_seq(range(13), "a"))
    other = make_seq([0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12], "b")
    assert pool.find_cached_prefix(other) == [0]


def test_no_prefix_caching():
    pool = BlockPool(8, BS, enable_prefix_caching=False)
    first = make_seq(range(12), "a")
    prefill(pool, first)
    assert pool.cached == {} and all(h is None for h in pool.block_hash)
    pool.free_sequence(first)
    assert pool.find_cached_prefix(make_seq(range(13), "b")) == []


def test_concurrent_identical_blocks_register_once():
    pool = BlockPool(8, BS, enable_prefix_caching=True)
    a, b = make_seq(range(9), "a"), make_seq(range(9), "b")
    # Both admitted before either computed anything: no hits, separate blocks.
    for seq in (a, b):
        assert pool.allocate(seq, 9, pool.find_cached_prefix(seq))
    compute(pool, a)
    compute(pool, b)
    assert a.block_hashes == b.block_hashes
    assert [pool.cached[h] for h in a.block_hashes] == a.block_table[:2]
    assert all(pool.block_hash[blk] is None for blk in b.block_table)
    assert_consistent(pool)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    # b's duplicates are unhashed: freed, they go before never-used and cached blocks.
    pool.free_sequence(b)
    assert list(pool.free) == [3, 4, 5, 6, 7]
    pool.free_sequence(a)
    assert list(pool.free) == [2, 3, 4, 5, 6, 7, 1, 0]
    assert_consistent(pool)


# --- LRU eviction -------------------------------------------------------------------------------

def test_eviction_order_is_lru_and_unhashed_first():
    pool = BlockPool(6, BS, enable_prefix_caching=True)
    a = make_seq(range(8), "a")           # 2 full blocks
    b = make_seq(range(100, 108), "b")    # 2 full blocks
    prefill(pool, a)
    prefill(pool, b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    a_hashes = list(a.block_hashes)
    pool.free_sequence(a)
    pool.free_sequence(b)
    # Never-used blocks first, then hashed blocks oldest-freed first; a sequence's tail
    # block goes before its head so that a shared prefix outlives its tails.
    assert list(pool.free) == [4, 5, 1, 0, 3, 2]

    c = make_seq(range(200, 212), "c")    # 3 blocks: takes 4, 5, then evicts a's tail
    assert pool.allocate(c, 12)
    assert c.block_table == [4, 5, 1]
    assert a_hashes[1] not in pool.cached and pool.block_hash[1] is None
    assert pool.cached[a_hashes[0]] == 0
    assert_consistent(pool)
    # a's prefix now hits only its first block.
    assert pool.find_cached_prefix(make_seq(range(9), "a2")) == [0]

    d = make_seq(range(300, 304), "d")    # evicts a's head next, then b's tail
    assert pool.allocate(d, 4) and d.block_table == [0]
    assert a_hashes[0] not in pool.cached
    assert pool.find_cached_prefix(make_seq(range(9), "a3")) == []
    assert_consistent(pool)


def test_reused_cached_block_moves_to_the_back_of_the_lru():
    pool = BlockPool(4, BS, enable_prefix_caching=True)
    a = make_seq(range(4), "a")
    b = make_seq(range(100, 104), "b")
    prefill(pool, a)
    prefill(pool, b)
    pool.free_sequence(a)
    pool.free_sequence(b)
    assert list(pool.free) == [2, 3, 0, 1]
    # a's block is hit again, then freed: it is now the most recently used.
    again = make_seq(list(range(4)) + [9], "a2")
    prefill(pool, again)
    assert again.block_table == [0, 2]
    pool.free_sequence(again)
    assert list(pool.free) == [2, 3, 1, 0]


def test_unhashed_blocks_are_reused_before_hashed_ones():
    pool = BlockPool(4, BS, enable_prefix_caching=True)
    x = make_seq(range(6), "x")   # one full block, one partial block
    prefill(pool, x)
    assert x.block_table == [0, 1] and x.num_registered_blocks == 1
    pool.free_sequence(x)
    # The partial (unhashed) block is freed last yet reused first; the hashed one is last.
    assert list(pool.free) == [1, 2, 3, 0]
    y = make_seq(range(50, 62), "y")
    assert pool.allocate(y, 12)
    assert y.block_table == [1, 2, 3]
    assert pool.cached == {x.block_hashes[0]: 0}


# --- running out of blocks ----------------------------------------------------------------------

def test_allocate_fails_without_side_effects():
    pool = BlockPool(4, BS, enable_prefix_caching=True)
    a = make_seq(range(12), "a")
    assert pool.allocate(a, 12)
    b = make_seq(range(50, 58), "b")
    before = snapshot(pool)
    assert not pool.allocate(b, 8)
    assert snapshot(pool) == before
    assert b.block_table == [] and b.num_computed_tokens == 0

    # Growing a running sequence past the pool fails the same way.
    compute(pool, a)
    a.append_token(1, None)
    assert pool.allocate(a, 1)
    compute(pool, a)
    for t in range(4):
        a.append_token(t, None)
    before = snapshot(pool)
    table = list(a.block_table)
    assert not pool.allocate(a, 4)
    assert snapshot(pool) == before and a.block_table == table


def test_allocate_counts_cached_hits_in_the_free_list():
    pool = BlockPool(4, BS, enable_prefix_caching=True)
    first = make_seq(range(8), "a")
    prefill(pool, first)
    pool.free_sequence(first)
    other = make_seq(range(50, 58), "o")
    assert pool.allocate(other, 8) and other.block_table == [2, 3]
    # 2 hits (both in the free list) + 2 fresh blocks needed, but only the hits are free.
    second = make_seq(list(range(8)) + [60, 61, 62, 63, 64], "b")
    hits = pool.find_cached_prefix(second)
    assert hits == [0, 1]
    before = snapshot(pool)
    assert not pool.allocate(second, 5, hits)
    assert snapshot(pool) == before
    assert second.block_table == [] and second.num_computed_tokens == 0
    assert second.num_cached_tokens == 0 and second.num_registered_blocks == 0
    # Once other's blocks are back, it fits.
    pool.free_sequence(other)
    assert pool.allocate(second, 5, hits)
    assert second.block_table[:2] == [0, 1] and len(second.block_table) == 4
    assert_consistent(pool)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_pool_exactly_full(num_blocks):
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=True)
    seq = make_seq(range(num_blocks * BS))
    assert pool.allocate(seq, num_blocks * BS) and pool.num_free_blocks == 0
    assert not pool.allocate(make_seq([1], "x"), 1)
