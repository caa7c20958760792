"""Picks a worker group for each request: least outstanding work, and among groups whose load
is close to the least, the one that most likely caches the request's prefix. The router keeps
the loads itself; the engine core tells it what happens to a request (routed, prefilled,
handed off, finished).

Outstanding work of a group = prompt tokens sent but not yet prefilled + requests running, as
the engine core counts them (no round trip to the workers). Prefix affinity remembers the
chained block hashes (the workers' own hash) of prompts recently routed to each group.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from streamvlm.contract.block_hash import hash_block
from streamvlm.engine.worker_group import WorkerGroup
from streamvlm.errors import EngineDeadError, EngineUnresponsiveError

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


@dataclass(slots=True)
class Route:
    """Where one request runs: its group (the decode group when disaggregated) and, until it
    has handed off its KV, its prefill group."""
    group: WorkerGroup
    prefill: WorkerGroup | None = None
    handed_off: bool = False

    @property
    def prompt_group(self) -> WorkerGroup:
        """The group that computes the prompt."""
        return self.prefill or self.group

    def holders(self) -> list[WorkerGroup]:
        """The groups that may hold the request's blocks now."""
        if self.prefill is None or self.handed_off:
            return [self.group]
        return [self.group, self.prefill]


class Router:
    def __init__(self, block_size: int, step_timeout_s: float) -> None:
        self.block_size = block_size
        self.step_timeout_s = step_timeout_s
        self._loads: dict[int, GroupLoad] = {}

    def add_group(self, group_id: int) -> None:
        self._loads[group_id] = GroupLoad()

    def load(self, group_id: int) -> GroupLoad:
        return self._loads[group_id]

    def pick(self, groups: list[WorkerGroup], prompt_token_ids: list[int], role: str) -> WorkerGroup:
        """The group of ``role`` among ``groups`` for a prompt; raises EngineDeadError when none
        is alive, EngineUnresponsiveError when none is making progress."""
        live = [g for g in groups if g.alive and g.role == role]
        if not live:
            raise EngineDeadError(f"no live {role} worker group")
        live = [g for g in live if g.responsive]
        if not live:
            raise EngineUnresponsiveError(
                f"no {role} worker group is making progress: each has sent nothing for more than "
                f"worker_step_timeout_s={self.step_timeout_s:g} s")
        if len(live) == 1:
            return live[0]
        hashes = prompt_block_hashes(prompt_token_ids, self.block_size)
        loads = [self._loads[g.group_id] for g in live]
        index = pick_group(loads, hashes)
        loads[index].remember(hashes)
        return live[index]

    def routed(self, route: Route, num_prompt_tokens: int) -> None:
        for holder in route.holders():
            load = self._loads[holder.group_id]
            load.num_requests += 1
            load.num_routed += 1
        self._loads[route.prompt_group.group_id].queued_prompt_tokens += num_prompt_tokens

    def unrouted(self, route: Route) -> None:
        """A request that finished before any group got it does not count as routed."""
        for holder in route.holders():
            self._loads[holder.group_id].num_routed -= 1

    def prefilled(self, route: Route, num_prompt_tokens: int) -> None:
        """Its first token arrived: the prompt is no longer queued work."""
        self._loads[route.prompt_group.group_id].queued_prompt_tokens -= num_prompt_tokens

    def handed_off(self, route: Route) -> None:
        """The decode group holds the KV now: the prefill group no longer holds the request
        (marked on the route, which then names the decode group alone as holder)."""
        assert route.prefill is not None
        self._loads[route.prefill.group_id].num_requests -= 1
        route.handed_off = True

    def finished(self, route: Route, num_prompt_tokens: int, prefilled: bool) -> None:
        for holder in route.holders():
            self._loads[holder.group_id].num_requests -= 1
        if not prefilled:
            self.prefilled(route, num_prompt_tokens)
