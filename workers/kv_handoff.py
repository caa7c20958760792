"""The worker's half of disaggregated prefill/decode (the transport is workers/kv_transfer.py).

Prefill side: a request whose prompt is computed and first token sampled is held, its blocks
kept, and sent to its decode group as they fill. Decode side: blocks are reserved for a prompt
whose KV will arrive, filled as the batches land, and the request then decodes as if it had
computed the prompt itself. The worker owns the requests; this object owns what is in transit.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from streamvlm.contract.protocol import AcceptKVPeers, ConnectKVPeers, KVEvent
from workers.kv_cache import BlockPool
from workers.kv_transfer import KVHeader, KVOutbox, KVPeerLinks, pack_shards, unpack_shards
from workers.model_runner import ModelRunner
from workers.multimodal import TORCH_DTYPES
from workers.scheduler import Scheduler
from workers.sequence import Sequence, SequenceStatus


class KVHandoff:
    def __init__(self, pool: BlockPool, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self.runner = runner
        self.outbox: KVOutbox | None = None           # prefill side, set by the process
        self.links: KVPeerLinks | None = None         # kv_transport "peer", set by the process
        self._held: dict[str, Sequence] = {}          # prefill side: computed, holding blocks
        self._next_block: dict[str, int] = {}         # prefill side: first block not sent yet
        self._receiving: dict[str, Sequence] = {}     # decode side: blocks reserved, KV awaited
        self._unreserved: deque[Sequence] = deque()   # decode side: waiting for free blocks
        self._events: list[KVEvent] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.receive_seconds = 0.0
        self.num_transfers = 0

    # ---- peers --------------------------------------------------------------------------------

    def connect(self, message: ConnectKVPeers) -> None:
        if self.outbox is None:
            raise RuntimeError("ConnectKVPeers reached a worker without a KV outbox")
        self.outbox.connect(message.addresses)
        if self.links is not None:
            self.links.connect(message.stores)

    def accept(self, message: AcceptKVPeers) -> None:
        if self.links is None:
            raise RuntimeError("AcceptKVPeers reached a worker without peer links")
        self.links.accept(message.prefill_groups)

    # ---- what the step loop reads -------------------------------------------------------------

    def has_events(self) -> bool:
        return bool(self._events)

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    @property
    def num_held(self) -> int:
        """Requests whose blocks are held for a handoff, on either side."""
        return len(self._held) + len(self._receiving) + len(self._unreserved)

    def forget(self, request_id: str) -> None:
        """The request was aborted: nothing more is sent or awaited for it."""
        self._next_block.pop(request_id, None)
        self._held.pop(request_id, None)
        self._receiving.pop(request_id, None)
        for seq in self._unreserved:
            if seq.request_id == request_id:
                self._unreserved.remove(seq)
                break

    # ---- the prefill side ---------------------------------------------------------------------

    def hold(self, seq: Sequence) -> None:
        """The prompt is computed and the first token sampled: hold the blocks for the decode group."""
        self.scheduler.detach(seq)
        self._held[seq.request_id] = seq
        self._events.append(KVEvent(seq.request_id, "prefilled"))
        self.send_ready_blocks(seq)

    def send(self, seq: Sequence, skip_blocks: int) -> None:
        """Send the prompt's blocks from skip_blocks on (the decode group caches the ones before):
        the full blocks computed so far now, later ones as prefill chunks complete them, the rest
        once the first token is sampled."""
        if seq.kv_role != "prefill" or seq.request_id in self._next_block:
            return
        self._next_block[seq.request_id] = skip_blocks
        self.send_ready_blocks(seq)

    def send_ready_blocks(self, seq: Sequence) -> None:
        """The blocks of seq's prompt that are ready and not sent yet, as one batch (nothing where
        the engine core has not asked for seq's blocks)."""
        bs = self.pool.block_size
        start = self._next_block.get(seq.request_id)
        if start is None:
            return
        last = seq.request_id in self._held
        end = -(-seq.num_prompt_tokens // bs) if last else min(seq.num_computed_tokens, seq.num_prompt_tokens) // bs
        if end <= start and not last:
            return
        try:
            shards = self.runner.gather_kv(seq.block_table[start:end])
            links = self.links
            payload = b"" if links is not None else pack_shards(shards)
            first_token = seq.token_ids[seq.num_prompt_tokens] if last else -1
            header = KVHeader(request_id=seq.request_id, last=last, first_token=first_token, start_block=start,
                              num_blocks=end - start, dtype=str(shards[0].dtype).removeprefix("torch."),
                              shape=list(shards[0].shape), num_shards=len(shards),
                              source_group=links.group_id if links else -1, via_peer_link=links is not None)
            self.outbox.send(seq.kv_peer, header, payload)
            if links is not None:   # the bytes follow their header, device to device
                blocks = torch.stack(shards)
                links.send(seq.kv_peer, blocks)
                num_bytes = blocks.numel() * blocks.element_size()
            else:
                num_bytes = len(payload)
        except (ValueError, RuntimeError) as exc:
            self._events.append(KVEvent(seq.request_id, "failed", error=f"KV send failed: {exc}"))
            return
        self._next_block[seq.request_id] = end
        if last:
            del self._next_block[seq.request_id]
        self.bytes_sent += num_bytes
        self._events.append(KVEvent(seq.request_id, "sent", num_bytes=num_bytes))

    def release(self, request_id: str) -> Sequence | None:
        """The decode group has the blocks: the held request, for the worker to free (None: not held)."""
        seq = self._held.pop(request_id, None)
        if seq is not None:
            self._events.append(KVEvent(request_id, "released"))
        return seq

    # ---- the decode side ----------------------------------------------------------------------

    def expect(self, seq: Sequence) -> None:
        """seq's prompt KV will arrive from its prefill group: reserve its blocks (once free)."""
        seq.status = SequenceStatus.HANDOFF
        self._unreserved.append(seq)
        self.reserve_blocks()

    def reserve_blocks(self) -> None:
        """Blocks for the prompts whose KV will arrive, oldest first; cached prefix blocks are
        shared and reported, so that the prefill group does not send them."""
        while self._unreserved:
            seq = self._unreserved[0]
            hits = self.pool.find_cached_prefix(seq)
            if not self.pool.allocate(seq, seq.num_prompt_tokens - len(hits) * self.pool.block_size, hits):
                return
            self._unreserved.popleft()
            seq.num_cached_tokens = 0   # what the user sees is the prefill group's cache hits
            self._receiving[seq.request_id] = seq
            self._events.append(KVEvent(seq.request_id, "reserved", cached_blocks=len(hits)))

    def receive(self, header: KVHeader, payload: bytes | memoryview) -> tuple[Sequence, str] | None:
        """One batch of a request's blocks into its reserved blocks; the last one lets it decode.
        Returns the request and the error where the batch does not fit, for the worker to end."""
        start = time.monotonic()
        peer_blocks = None
        if header.via_peer_link:
            # Taken off the link even for an aborted request: the link delivers in order.
            peer_blocks = self.links.receive(header.source_group, [header.num_shards, *header.shape],
                                             TORCH_DTYPES[header.dtype])
            payload = memoryview(b"")
        seq = self._receiving.get(header.request_id)
        if seq is None:
            return None   # aborted meanwhile: its blocks are already free
        try:
            shards = unpack_shards(header, payload) if peer_blocks is None else list(peer_blocks.unbind(0))
            end_block = header.start_block + header.num_blocks
            if header.last and end_block * self.pool.block_size < seq.num_prompt_tokens:
                raise ValueError(f"the last blocks end at block {end_block}, short of the prompt's "
                                 f"{seq.num_prompt_tokens} tokens")
            if header.num_blocks:
                self.runner.scatter_kv(seq.block_table[header.start_block:end_block], shards)
        except (ValueError, RuntimeError) as exc:
            del self._receiving[seq.request_id]
            return seq, f"KV receive failed: {exc}"
        num_bytes = len(payload) if peer_blocks is None else peer_blocks.numel() * peer_blocks.element_size()
        self.bytes_received += num_bytes
        self.receive_seconds += time.monotonic() - start
        seq.kv_received_bytes += num_bytes
        if not header.last:
            return None
        del self._receiving[seq.request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.pool.register_full_blocks(seq)
        seq.append_token(header.first_token, None)
        seq.take_pending()   # the prefill group streamed the first token already
        self.scheduler.resume(seq)
        self.num_transfers += 1
        self._events.append(KVEvent(seq.request_id, "received", num_bytes=seq.kv_received_bytes))
        return None
