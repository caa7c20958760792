"""The worker's step loop: requests and aborts in, one batched StepOutput per step out."""

from __future__ import annotations

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.model_source import ModelSource
import time
from collections import deque
from dataclasses import dataclass

import torch

from streamvlm.contract.protocol import (AbortRequest, AcceptKVPeers, AddRequest, ConnectKVPeers, KVEvent,
                                ReleaseKV, RequestDelta, SendKV, StepOutput, StepStats)
from workers.kv_cache import BlockPool
from workers.kv_transfer import KVHeader, KVOutbox, KVPeerLinks, pack_shards, unpack_shards
from workers.multimodal import TORCH_DTYPES
from workers.distributed import tp_size
from workers.model_runner import ModelRunner, PendingStep
from workers.multimodal import MultiModalInput
from workers.scheduler import Scheduler
from workers.sequence import Sequence, SequenceStatus


@dataclass
class LaunchedStep:
    pending: PendingStep
    # Async scheduling: where each sampling sequence's placeholder token sits (None: the tokens are
    # appended when they arrive).
    positions: list[int] | None


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.runner = ModelRunner(config, source, max_model_len)
        capacity = self.runner.kv_memory.num_blocks * config.block_size
        if capacity < max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.runner.kv_memory.num_blocks} blocks of "
                f"{config.block_size}), fewer than max_model_len={max_model_len}: raise "
                f"num_kv_blocks or lower max_model_len")
        self.pool = BlockPool(self.runner.kv_memory.num_blocks, config.block_size,
                              config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.sequences: dict[str, Sequence] = {}
        self.num_steps = 0
        self._arrivals = 0
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = (self.runner.device.type == "cuda" and tp_size() == 1
                                     and not config.skip_model_forward)
        # The other ranks of a tensor-parallel group fill their placeholders from rank 0's broadcast.
        self.runner.shares_sampled_tokens = self.async_scheduling and tp_size() > 1
        self._in_flight: LaunchedStep | None = None
        self._pending_deltas: list[RequestDelta] = []
        # Disaggregated prefill/decode (see workers/kv_transfer.py).
        self.kv_outbox: KVOutbox | None = None           # prefill side, set by the process
        self.kv_links: KVPeerLinks | None = None         # kv_transport "peer", set by the process
        self._handoffs: dict[str, Sequence] = {}         # prefill side: computed, holding blocks
        self._next_block: dict[str, int] = {}            # prefill side: first block not sent yet
        self._receiving: dict[str, Sequence] = {}        # decode side: blocks reserved, KV awaited
        self._unreserved: deque[Sequence] = deque()      # decode side: waiting for free blocks
        self._kv_events: list[KVEvent] = []
        self.kv_bytes_sent = 0
        self.kv_bytes_received = 0
        self.kv_receive_seconds = 0.0
        self.num_kv_transfers = 0

    def handle(self, message) -> None:
        if isinstance(message, AddRequest):
            self.add_request(message)
        elif isinstance(message, AbortRequest):
            self.abort(message.request_ids)
        elif isinstance(message, SendKV):
            self.send_kv(message.request_id, message.skip_blocks)
        elif isinstance(message, ReleaseKV):
            self.release_kv(message.request_id)
        elif isinstance(message, ConnectKVPeers):
            if self.kv_outbox is None:
                raise RuntimeError("ConnectKVPeers reached a worker without a KV outbox")
            self.kv_outbox.connect(message.addresses)
            if self.kv_links is not None:
                self.kv_links.connect(message.stores)
        elif isinstance(message, AcceptKVPeers):
            if self.kv_links is None:
                raise RuntimeError("AcceptKVPeers reached a worker without peer links")
            self.kv_links.accept(message.prefill_groups)
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")

    def add_request(self, req: AddRequest) -> None:
        error = self._check(req)
        if error:
            self._pending_deltas.append(RequestDelta(req.request_id, [], finish_reason="error",
                                                     error=error))
            return
        seq = Sequence(req.request_id, req.prompt_token_ids, req.params, req.eos_token_ids,
                       self._arrivals)
        if req.mm_items:
            try:
                self._attach_multimodal(seq, req)
            except ValueError as exc:
                self._pending_deltas.append(RequestDelta(req.request_id, [],
                                                         finish_reason="error", error=str(exc)))
                return
        self._arrivals += 1
        self.sequences[req.request_id] = seq
        seq.kv_role, seq.kv_peer = req.kv_role, req.kv_peer
        if req.kv_role == "decode":
            seq.status = SequenceStatus.HANDOFF
            self._unreserved.append(seq)
            self._reserve_blocks()
        else:
            self.scheduler.add(seq)

    def _attach_multimodal(self, seq: Sequence, req: AddRequest) -> None:
        """Decode the request's items, check them against its placeholder tokens, and work out
        M-RoPE positions. ValueError names what is wrong."""
        if req.mm_items and not self.runner.supports_images:
            raise ValueError("this model does not accept image input")
        items = [MultiModalInput.from_item(item) for item in req.mm_items]
        items.sort(key=lambda item: item.offset)
        previous_end = 0
        image_token_id = getattr(self.runner.model, "image_token_id", None)
        for item in items:
            if item.num_tokens < 1 or item.offset < previous_end or item.end > seq.num_prompt_tokens:
                raise ValueError(f"image placeholder run [{item.offset}, {item.end}) lies outside "
                                 f"the prompt or overlaps another")
            run = seq.token_ids[item.offset:item.end]
            if any(t != image_token_id for t in run):
                raise ValueError(f"prompt tokens [{item.offset}, {item.end}) are not all the "
                                 f"image placeholder token {image_token_id}")
            previous_end = item.end
        seq.mm_items = items
        if self.runner.uses_mrope:
            positions, delta = self.runner.model.mrope_positions(seq.prompt_token_ids, items)
            seq.mrope_positions, seq.mrope_delta = positions, delta

    def _check(self, req: AddRequest) -> str | None:
        if req.request_id in self.sequences:
            return f"request id {req.request_id!r} is already running"
        if not req.prompt_token_ids:
            return "prompt is empty"
        if len(req.prompt_token_ids) >= self.max_model_len:
            return (f"prompt has {len(req.prompt_token_ids)} tokens, more than "
                    f"max_model_len={self.max_model_len} allows")
        return None

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._next_block.pop(request_id, None)
            seq = self.sequences.pop(request_id, None)
            if seq is not None:
                self._forget_handoff(seq)
                self.scheduler.remove(seq)
                self._pending_deltas.append(RequestDelta(request_id, [], finish_reason="abort"))

    def _forget_handoff(self, seq: Sequence) -> None:
        self._handoffs.pop(seq.request_id, None)
        self._receiving.pop(seq.request_id, None)
        if seq in self._unreserved:
            self._unreserved.remove(seq)

    def has_work(self) -> bool:
        # Reservations waiting for blocks are retried by the next step, which whatever frees
        # blocks (a finish, an abort, a transfer) brings about.
        return (self.scheduler.has_work() or bool(self._pending_deltas) or bool(self._kv_events)
                or self._in_flight is not None)

    # ---- disaggregated prefill/decode: the prefill side -------------------------------------

    def _hand_off(self, seq: Sequence) -> None:
        """The prompt is computed and the first token sampled: hold the blocks for the decode group."""
        self.scheduler.detach(seq)
        self._handoffs[seq.request_id] = seq
        self._kv_events.append(KVEvent(seq.request_id, "prefilled"))
        if seq.request_id in self._next_block:
            self._send_blocks(seq)

    def send_kv(self, request_id: str, skip_blocks: int) -> None:
        """Send the prompt's blocks from skip_blocks on (the decode group caches the ones before):
        the full blocks computed so far now, later ones as prefill chunks complete them, the rest
        once the first token is sampled."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.kv_role != "prefill" or request_id in self._next_block:
            return
        self._next_block[request_id] = skip_blocks
        self._send_blocks(seq)

    def _send_blocks(self, seq: Sequence) -> None:
        """The blocks of seq's prompt that are ready and not sent yet, as one batch."""
        bs = self.pool.block_size
        start = self._next_block.get(seq.request_id)
        if start is None:
            return
        last = seq.request_id in self._handoffs
        end = -(-seq.num_prompt_tokens // bs) if last else min(seq.num_computed_tokens, seq.num_prompt_tokens) // bs
        if end <= start and not last:
            return
        try:
            shards = self.runner.gather_kv(seq.block_table[start:end])
            links = self.kv_links
            payload = b"" if links is not None else pack_shards(shards)
            first_token = seq.token_ids[seq.num_prompt_tokens] if last else -1
            header = KVHeader(request_id=seq.request_id, last=last, first_token=first_token, start_block=start,
                              num_blocks=end - start, dtype=str(shards[0].dtype).removeprefix("torch."),
                              shape=list(shards[0].shape), num_shards=len(shards),
                              source_group=links.group_id if links else -1, via_peer_link=links is not None)
            self.kv_outbox.send(seq.kv_peer, header, payload)
            if links is not None:   # the bytes follow their header, device to device
                blocks = torch.stack(shards)
                links.send(seq.kv_peer, blocks)
                num_bytes = blocks.numel() * blocks.element_size()
            else:
                num_bytes = len(payload)
        except (ValueError, RuntimeError) as exc:
            self._kv_events.append(KVEvent(seq.request_id, "failed", error=f"KV send failed: {exc}"))
            return
        self._next_block[seq.request_id] = end
        if last:
            del self._next_block[seq.request_id]
        self.kv_bytes_sent += num_bytes
        self._kv_events.append(KVEvent(seq.request_id, "sent", num_bytes=num_bytes))

    def release_kv(self, request_id: str) -> None:
        """The decode group has the blocks: free them here (they stay in this prefix cache)."""
        seq = self._handoffs.pop(request_id, None)
        if seq is not None:
            del self.sequences[request_id]
            self.scheduler.remove(seq)
            self._kv_events.append(KVEvent(request_id, "released"))

    # ---- disaggregated prefill/decode: the decode side --------------------------------------

    def _reserve_blocks(self) -> None:
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
            self._kv_events.append(KVEvent(seq.request_id, "reserved", cached_blocks=len(hits)))

    def receive_kv(self, header: KVHeader, payload: bytes | memoryview) -> None:
        """One batch of a request's blocks into its reserved blocks; the last one lets it decode."""
        start = time.monotonic()
        peer_blocks = None
        if header.via_peer_link:
            # Taken off the link even for an aborted request: the link delivers in order.
            peer_blocks = self.kv_links.receive(header.source_group, [header.num_shards, *header.shape],
                                                TORCH_DTYPES[header.dtype])
            payload = memoryview(b"")
        seq = self._receiving.get(header.request_id)
        if seq is None:
            return   # aborted meanwhile: its blocks are already free
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
            del self.sequences[seq.request_id]
            self.scheduler.remove(seq)
            self._pending_deltas.append(RequestDelta(seq.request_id, [], finish_reason="error",
                                                     error=f"KV receive failed: {exc}"))
            return
        num_bytes = len(payload) if peer_blocks is None else peer_blocks.numel() * peer_blocks.element_size()
        self.kv_bytes_received += num_bytes
        seconds = time.monotonic() - start
        self.kv_receive_seconds += seconds
        seq.kv_received_bytes += num_bytes
        if not header.last:
            return
        del self._receiving[seq.request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.pool.register_full_blocks(seq)
        seq.append_token(header.first_token, None)
        seq.take_pending()   # the prefill group streamed the first token already
        self.scheduler.resume(seq)
        self.num_kv_transfers += 1
        self._kv_events.append(KVEvent(seq.request_id, "received", num_bytes=seq.kv_received_bytes))

    def step(self) -> StepOutput:
        """Schedule and launch one step. With async scheduling the step before is still on the device
        meanwhile: its tokens are taken (and streamed) after this one is queued behind it."""
        if self._unreserved:
            self._reserve_blocks()
        deltas, self._pending_deltas = self._pending_deltas, []
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and not self._may_schedule_ahead():
            self._complete(in_flight, deltas)
            in_flight = None
        plan = self.scheduler.schedule()
        if plan.chunks and self.runner.supports_images and not self.config.skip_model_forward:
            failed = self.runner.encoder.encode_pending(plan.chunks)
            for seq, error in failed.items():
                self.scheduler.remove(seq)
                del self.sequences[seq.request_id]
                deltas.append(RequestDelta(seq.request_id, [], finish_reason="error", error=error))
            plan.chunks = [c for c in plan.chunks if c.seq not in failed]
        launched = None
        if plan.chunks:
            pending = self.runner.launch(plan.chunks, in_flight.pending if in_flight else None)
            for chunk in plan.chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
                if chunk.seq.encoder_outputs:
                    chunk.seq.release_encoder_outputs()
            positions = None
            if self.async_scheduling:
                positions = [self._stand_in(seq, row) for row, seq in enumerate(pending.seqs)]
            launched = LaunchedStep(pending, positions)
        # While the device runs the step: the step before's tokens, and what needs no tokens.
        if in_flight is not None:
            self._complete(in_flight, deltas)
        if launched is not None:
            for chunk in plan.chunks:
                if chunk.seq.status is SequenceStatus.FINISHED:
                    continue   # ended by the step before (async scheduling): its blocks are free
                self.pool.register_full_blocks(chunk.seq)
                if chunk.seq.request_id in self._next_block:
                    self._send_blocks(chunk.seq)   # the full blocks this chunk completed
            if self.async_scheduling:
                self._in_flight = launched
            else:
                self._complete(launched, deltas)
        self.num_steps += 1
        kv_events, self._kv_events = self._kv_events, []
        return StepOutput(step=self.num_steps, deltas=deltas, kv_events=kv_events, stats=StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_scheduled_tokens=plan.num_tokens,
            num_free_blocks=self.pool.num_free_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_total_blocks=self.pool.num_blocks,
            num_preempted=plan.num_preempted,
            encoder_cache_hits=self.runner.encoder.cache.hits,
            num_encoded_items=self.runner.encoder.num_encoded_items,
            kv_bytes_sent=self.kv_bytes_sent,
            kv_bytes_received=self.kv_bytes_received,
            kv_receive_seconds=self.kv_receive_seconds,
            num_kv_transfers=self.num_kv_transfers,
            num_handoffs_held=len(self._handoffs) + len(self._receiving) + len(self._unreserved),
        ))

    def _may_schedule_ahead(self) -> bool:
        """Penalties read the tokens generated so far on the host: those steps wait for them."""
        return not any(seq.params.reads_history for seq in self.scheduler.running)

    def _stand_in(self, seq: Sequence, row: int) -> int:
        """Async scheduling: a placeholder for seq's token being sampled in row `row` of the step just
        launched; a sequence that this token ends for certain is scheduled no more."""
        position = seq.append_placeholder(row)
        if seq.kv_role == "prefill" or self._ends_by_length(seq, position + 1):
            self.scheduler.retire(seq)
        return position

    def _complete(self, step: LaunchedStep, deltas: list[RequestDelta]) -> None:
        """Take a launched step's sampled tokens (the step's one wait for the device) and stream them."""
        sampled = self.runner.finish(step.pending)
        for row, (seq, token, logprobs) in enumerate(zip(step.pending.seqs, sampled.token_ids, sampled.logprobs)):
            if seq.status is SequenceStatus.FINISHED:
                continue   # aborted, or (async scheduling) ended by the step before
            if step.positions is None:
                seq.append_token(token, logprobs)
                num_tokens = seq.num_tokens
            else:
                seq.fill_placeholder(step.positions[row], token, logprobs)
                num_tokens = step.positions[row] + 1
            finish_reason = self._finish_reason(seq, token, num_tokens)
            if finish_reason:
                self.scheduler.remove(seq)
                del self.sequences[seq.request_id]
            elif seq.kv_role == "prefill":
                self._hand_off(seq)
            token_ids, token_logprobs = seq.take_pending()
            output_index = num_tokens - seq.num_prompt_tokens - len(token_ids)
            deltas.append(RequestDelta(seq.request_id, token_ids, token_logprobs,
                                       finish_reason, seq.num_cached_tokens,
                                       output_index=output_index))

    def _finish_reason(self, seq: Sequence, token: int, num_tokens: int) -> str | None:
        """Why seq ends with `token` as its token number num_tokens (None: it goes on)."""
        p = seq.params
        num_output_tokens = num_tokens - seq.num_prompt_tokens
        if num_output_tokens >= p.min_tokens:
            if token in seq.stop_token_ids or (token in seq.eos_token_ids and not p.ignore_eos):
                return "stop"
        if self._ends_by_length(seq, num_tokens):
            return "length"
        return None

    def _ends_by_length(self, seq: Sequence, num_tokens: int) -> bool:
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len
