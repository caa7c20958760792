"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first (decodes before unfinished prefills, so a long prompt never
starves the token streams), then waiting ones while budget, sequence slots and blocks remain.
Images have a budget of their own (EncoderBudget): a prefill chunk stops before the first image
that does not fit in the step's, and a waiting sequence that cannot start keeps later ones
waiting behind it. When blocks run out, the newest running sequence is preempted: its blocks are
freed and it waits to be recomputed (its prefix may well still be cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from workers.encoder_budget import EncoderBudget, nothing_encoded
from workers.kv_cache import BlockPool
from workers.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int          # first token position computed in this step
    num_tokens: int     # tokens computed in this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so the step samples its next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, *,
                 max_num_encoder_tokens: int | None = None,
                 is_encoded: Callable[[str], bool] = nothing_encoded) -> None:
        """``max_num_encoder_tokens`` None: max_num_batched_tokens. ``is_encoded(item_hash)``: the
        encoder cache holds that item (it costs no encoder budget)."""
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_encoder_tokens = max_num_encoder_tokens or max_num_batched_tokens
        self.is_encoded = is_encoded
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Sequences whose prompt KV arrived from a prefill group: they join the running batch
        # (as decodes) when it has room.
        self.resumed: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.resumed)

    def resume(self, seq: Sequence) -> None:
        """A sequence that holds its blocks and computed prompt joins as a decode."""
        seq.status = SequenceStatus.WAITING
        self.resumed.append(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a running (or finishing) sequence out of the schedule keeping its blocks (handed off)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        seq.status = SequenceStatus.HANDOFF

    def retire(self, seq: Sequence) -> None:
        """A running sequence whose last token is in flight: schedule it no more, keep its blocks."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHING

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the schedule (finished or aborted) and free its blocks now."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            (self.resumed if seq in self.resumed else self.waiting).remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.pool.free_sequence(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        encoder = EncoderBudget(self.max_num_encoder_tokens, self.is_encoded)
        while self.resumed and len(self.running) < self.max_num_seqs:
            seq = self.resumed.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        # Decodes (one token left to compute) before prefill chunks; stable within each kind.
        order = sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new, items = min(len(seq.token_ids) - seq.num_computed_tokens, budget), None
            if seq.mm_items:
                num_new, items = encoder.fit(seq, seq.num_computed_tokens, num_new)
            if num_new == 0:
                continue   # its next image waits for a step with encoder budget left
            while not self.pool.allocate(seq, num_new):
                victim = self._pick_victim(out.chunks)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
                budget -= num_new
                if items:
                    encoder.spend(items)

        while (self.waiting and budget > 0 and not out.num_preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            hits = [] if seq.needs_whole_prompt else self.pool.find_cached_prefix(seq)
            start = len(hits) * self.pool.block_size
            num_new, items = encoder.fit(seq, start, min(seq.num_tokens - start, budget))
            if num_new == 0 or not self.pool.allocate(seq, num_new, hits):
                break   # later arrivals do not overtake it
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
            encoder.spend(items)
        return out

    def _pick_victim(self, chunks: list[ScheduledChunk]) -> Sequence:
        # The most recently admitted running sequence that is not already in this step.
        scheduled = {id(chunk.seq) for chunk in chunks}
        for seq in reversed(self.running):
            if id(seq) not in scheduled:
                return seq
        raise RuntimeError("KV cache too small to hold a single sequence")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
