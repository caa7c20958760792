"""Picks a worker group for each request: least outstanding work, and among groups whose load
is close to the least, the one that most likely caches the request's prefix.

Outstanding work of a group = prompt tokens sent but not yet prefilled + requests running, as
the engine core counts them (no round trip to the workers). Prefix affinity remembers the
chained block hashes (the workers' own hash) of prompts recently routed to each group.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from streamvlm.contract.block_hash import hash_block

# Loads within this many tokens of the least loaded group count as close.
CLOSE_LOAD_TOKENS = 256
PREFIX_INDEX_BLOCKS = 16384


@dataclass
class GroupLoad:
    queued_prompt_tokens: int = 0
    num_requests: int = 0
    num_routed: int = 0           # requests ever routed here
    recent_blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    @property
    def outstanding(self) -> int:
        return self.queued_prompt_tokens + self.num_requests

    def cached_prefix_blocks(self, hashes: list[bytes]) -> int:
        for i, block_hash in enumerate(hashes):
            if block_hash not in self.recent_blocks:
                return i
        return len(hashes)

    def remember(self, hashes: list[bytes]) -> None:
        for block_hash in hashes:
            self.recent_blocks[block_hash] = None
            self.recent_blocks.move_to_end(block_hash)
        while len(self.recent_blocks) > PREFIX_INDEX_BLOCKS:
            self.recent_blocks.popitem(last=False)


def prompt_block_hashes(prompt_token_ids: list[int], block_size: int) -> list[bytes]:
    hashes: list[bytes] = []
    for start in range(0, len(prompt_token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, prompt_token_ids[start:start + block_size]))
    return hashes


def pick_group(loads: list[GroupLoad], hashes: list[bytes]) -> int:
    """Index of the group to use among ``loads`` (live groups only)."""
    least = min(load.outstanding for load in loads)
    close = [i for i, load in enumerate(loads) if load.outstanding <= least + CLOSE_LOAD_TOKENS]
    return max(close, key=lambda i: (loads[i].cached_prefix_blocks(hashes),
                                     -loads[i].outstanding))
