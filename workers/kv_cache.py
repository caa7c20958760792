"""Paged KV-cache bookkeeping: a pool of reference-counted blocks with prefix caching.

A full block's hash chains the previous block's hash, its token ids and optional extra keys
(such as the hashes of images whose tokens it holds), so equal hashes mean equal prefixes.
Freed blocks keep their hash and stay reusable until the pool needs them again (LRU).
"""

from __future__ import annotations

from collections import OrderedDict

from streamvlm.contract.block_hash import hash_block
from workers.sequence import Sequence


class BlockPool:
    """Owns block ids, their reference counts, the free list and the prefix-cache index."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks in eviction order: the first is reused first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of seq, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, num_full)
        hits: list[int] = []
        for block_hash in seq.block_hashes[:num_full]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow seq's block table to hold its computed tokens plus num_new_tokens.

        cached_blocks (only for a sequence with no blocks yet) are prefix-cache hits: they are
        shared, and their tokens count as computed. Returns False, changing nothing, if the pool
        is too small.
        """
        if not cached_blocks:   # the common case, a decode: usually its last block has room
            num_needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
            if num_needed <= len(seq.block_table):
                return True
        num_hit_tokens = len(cached_blocks) * self.block_size
        first_token = num_hit_tokens if cached_blocks else seq.num_computed_tokens
        num_needed = -(-(first_token + num_new_tokens) // self.block_size)
        num_fresh = num_needed - len(seq.block_table) - len(cached_blocks)
        num_hits_in_free = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if num_fresh > self.num_free_blocks - num_hits_in_free:
            return False
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        for _ in range(max(0, num_fresh)):
            seq.block_table.append(self._take_free_block())
        if cached_blocks:
            seq.num_computed_tokens = num_hit_tokens
            if not seq.num_preemptions:
                seq.num_cached_tokens = num_hit_tokens
            seq.num_registered_blocks = len(cached_blocks)
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make seq's newly computed full blocks findable by later requests."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block_id, block_hash = seq.block_table[i], seq.block_hashes[i]
            # An identical block computed concurrently by another sequence keeps the entry.
            if self.block_hash[block_id] is None and block_hash not in self.cached:
                self.block_hash[block_id] = block_hash
                self.cached[block_hash] = block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free_sequence(self, seq: Sequence) -> None:
        # Tail blocks go into the free list first so that a shared prefix outlives its tails.
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free[block_id] = None
                if self.block_hash[block_id] is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        evicted = self.block_hash[block_id]
        if evicted is not None:
            del self.cached[evicted]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else None
            block_tokens = seq.token_ids[i * bs:(i + 1) * bs]
            extra = seq.block_extra_keys(i * bs, (i + 1) * bs)
            seq.block_hashes.append(hash_block(parent, block_tokens, extra))
