"""The worker's step loop: requests and aborts in, one batched StepOutput per step out."""

from __future__ import annotations

import time
from dataclasses import dataclass

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.model_source import ModelSource
from streamvlm.contract.protocol import (AbortRequest, AcceptKVPeers, AddRequest, ConnectKVPeers, ReleaseKV,
                                         NewTokens, RequestDelta, SendKV, StepOutput, StepStats)
from workers.device_settings import DeviceSettings
from workers.distributed import tp_size
from workers.kv_cache import BlockPool
from workers.kv_handoff import KVHandoff
from workers.kv_transfer import KVHeader
from workers.model_runner import ModelRunner, PendingStep
from workers.multimodal import MultiModalInput
from workers.request_timing import DeviceSpan, WorkerTimeline
from workers.scheduler import ScheduledChunk, Scheduler
from workers.sequence import Sequence, SequenceStatus
from workers.stop_rules import ends_by_length, finish_reason
from workers.structured_output import GrammarMatchers


@dataclass
class LaunchedStep:
    pending: PendingStep
    # Async scheduling: where each sampling sequence's placeholder token sits (None: the tokens are
    # appended when they arrive).
    positions: list[int] | None


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, settings: DeviceSettings) -> None:
        """``config`` resolved by the engine core, ``settings`` by this worker group."""
        self.config = config
        self.settings = settings
        self.max_model_len = max_model_len = config.model.max_model_len
        self.runner = ModelRunner(config, source, settings)
        capacity = self.runner.kv_memory.num_blocks * config.cache.block_size
        if capacity < max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.runner.kv_memory.num_blocks} blocks of "
                f"{config.cache.block_size}), fewer than max_model_len={max_model_len}: raise "
                f"num_kv_blocks or lower max_model_len")
        self.pool = BlockPool(self.runner.kv_memory.num_blocks, config.cache.block_size,
                              config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens,
                                   max_num_encoder_tokens=config.scheduler.max_num_encoder_tokens,
                                   is_encoded=self.runner.encoder.cache.holds)
        self.sequences: dict[str, Sequence] = {}
        self.num_steps = 0
        self._arrivals = 0
        self.async_scheduling = settings.async_scheduling
        # The other ranks of a tensor-parallel group fill their placeholders from rank 0's broadcast.
        self.runner.shares_sampled_tokens = self.async_scheduling and tp_size() > 1
        self._in_flight: LaunchedStep | None = None
        self._pending_deltas: list[RequestDelta] = []
        self.kv_handoff = KVHandoff(self.pool, self.scheduler, self.runner)
        self.grammars = GrammarMatchers(source, config.model.tokenizer, self.runner.model.args.vocab_size)

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
            self.kv_handoff.connect(message)
        elif isinstance(message, AcceptKVPeers):
            self.kv_handoff.accept(message)
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")

    def add_request(self, req: AddRequest) -> None:
        timeline = WorkerTimeline(time.monotonic()) if req.collect_timings else None
        error = self._check(req)
        if error:
            self._pending_deltas.append(RequestDelta(req.request_id, [], finish_reason="error",
                                                     error=error))
            return
        seq = Sequence(req.request_id, req.prompt_token_ids, req.params, req.eos_token_ids,
                       self._arrivals)
        if req.mm_items or req.grammar:
            try:
                if req.mm_items:
                    self._attach_multimodal(seq, req)
                if req.grammar:
                    seq.grammar = self.grammars.build(req.grammar)
            except ValueError as exc:
                self._pending_deltas.append(RequestDelta(req.request_id, [],
                                                         finish_reason="error", error=str(exc)))
                return
        if timeline is not None:
            timeline.attached = time.monotonic()
            seq.timeline = timeline
        self._arrivals += 1
        self.sequences[req.request_id] = seq
        seq.kv_role, seq.kv_peer = req.kv_role, req.kv_peer
        if req.kv_role == "decode":
            seq.skip_prompt_logprobs()   # the prefill group computes the prompt and reports them
            self.kv_handoff.expect(seq)
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
            self.kv_handoff.forget(request_id)
            seq = self.sequences.pop(request_id, None)
            if seq is not None:
                self.scheduler.remove(seq)
                self._pending_deltas.append(RequestDelta(request_id, [], finish_reason="abort"))

    def has_work(self) -> bool:
        # Reservations waiting for blocks are retried by the next step, which whatever frees
        # blocks (a finish, an abort, a transfer) brings about.
        return (self.scheduler.has_work() or bool(self._pending_deltas) or self.kv_handoff.has_events()
                or self._in_flight is not None)

    # ---- disaggregated prefill/decode: the requests' side; the blocks' is KVHandoff's ------------

    def send_kv(self, request_id: str, skip_blocks: int) -> None:
        seq = self.sequences.get(request_id)
        if seq is not None:
            self.kv_handoff.send(seq, skip_blocks)

    def release_kv(self, request_id: str) -> None:
        """The decode group has the blocks: free them here (they stay in this prefix cache)."""
        seq = self.kv_handoff.release(request_id)
        if seq is not None:
            del self.sequences[request_id]
            self.scheduler.remove(seq)

    def receive_kv(self, header: KVHeader, payload: bytes | memoryview) -> None:
        failed = self.kv_handoff.receive(header, payload)
        if failed is not None:
            seq, error = failed
            del self.sequences[seq.request_id]
            self.scheduler.remove(seq)
            self._pending_deltas.append(RequestDelta(seq.request_id, [], finish_reason="error", error=error))

    def step(self) -> StepOutput:
        """Schedule and launch one step. With async scheduling the step before is still on the device
        meanwhile: its tokens are taken (and streamed) after this one is queued behind it."""
        self.kv_handoff.reserve_blocks()
        deltas, self._pending_deltas = self._pending_deltas, []
        tokens = NewTokens()
        in_flight, self._in_flight = self._in_flight, None
        # Sampling that reads the tokens so far (penalties, bad words, grammars) cannot run ahead
        # of the step in flight: this step's forward pass is queued now, its sampling once the
        # step before's tokens are in.
        defer_sampling = in_flight is not None and not self._may_sample_ahead()
        plan = self.scheduler.schedule()
        timed = self._timed_prefills(plan.chunks)
        if plan.chunks and self.runner.supports_images and not self.config.model.skip_model_forward:
            encoding = [c.seq.timeline for c in timed if _reaches_unencoded_item(c)]
            launched_at = time.monotonic()
            span = DeviceSpan(self.runner.device) if encoding else None
            failed = self.runner.encoder.encode_pending(plan.chunks)
            if span is not None:
                span.stop()
                for timeline in encoding:
                    timeline.encoding(span, launched_at)
            for seq, error in failed.items():
                self.scheduler.remove(seq)
                del self.sequences[seq.request_id]
                deltas.append(RequestDelta(seq.request_id, [], finish_reason="error", error=error))
            plan.chunks = [c for c in plan.chunks if c.seq not in failed]
        launched = None
        if plan.chunks:
            pending = self.runner.launch(plan.chunks, in_flight.pending if in_flight else None, defer_sampling)
            for chunk in plan.chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
                if chunk.seq.encoder_outputs:
                    chunk.seq.release_encoder_outputs()
            launched = LaunchedStep(pending, None)
            if self.async_scheduling and not defer_sampling:
                launched.positions = self._stand_ins(pending.seqs)
        # While the device runs the step: the step before's tokens, and what needs no tokens.
        if in_flight is not None:
            self._complete(in_flight, deltas, tokens)
        if launched is not None and defer_sampling:
            self.runner.sample(launched.pending)
            launched.positions = self._stand_ins(launched.pending.seqs)
        if launched is not None:
            for chunk in plan.chunks:
                seq = chunk.seq
                if seq.status is SequenceStatus.FINISHED:
                    continue   # ended by the step before (async scheduling): its blocks are free
                self.pool.register_full_blocks(seq)
                if seq.kv_role == "prefill":
                    self.kv_handoff.send_ready_blocks(seq)   # the full blocks this chunk completed
            if self.async_scheduling:
                self._in_flight = launched
            else:
                self._complete(launched, deltas, tokens)
        self.num_steps += 1
        handoff = self.kv_handoff
        return StepOutput(step=self.num_steps, deltas=deltas, tokens=tokens, kv_events=handoff.take_events(), stats=StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_scheduled_tokens=plan.num_tokens,
            num_free_blocks=self.pool.num_free_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_total_blocks=self.pool.num_blocks,
            num_preempted=plan.num_preempted,
            encoder_cache_hits=self.runner.encoder.cache.hits,
            num_encoded_items=self.runner.encoder.num_encoded_items,
            kv_bytes_sent=handoff.bytes_sent,
            kv_bytes_received=handoff.bytes_received,
            kv_receive_seconds=handoff.receive_seconds,
            num_kv_transfers=handoff.num_transfers,
            num_handoffs_held=handoff.num_held,
        ))

    @staticmethod
    def _timed_prefills(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """The chunks that compute part of the prompt of a request that collects timings."""
        timed = [c for c in chunks if c.seq.timeline is not None and c.start < c.seq.num_prompt_tokens]
        if timed:
            now = time.monotonic()
            for chunk in timed:
                chunk.seq.timeline.in_step(now)
        return timed

    def _may_sample_ahead(self) -> bool:
        """Penalties, bad words and grammars read the tokens generated so far on the host: a step
        with such a sequence samples only once the step before's tokens are in."""
        return not any(seq.params.reads_history for seq in self.scheduler.running)

    def _stand_ins(self, seqs: list[Sequence]) -> list[int]:
        """Async scheduling: placeholders for the tokens of the step just launched (-1 for a
        sequence the step before has just ended: nothing follows its last token)."""
        return [self._stand_in(seq, row) if seq.status is not SequenceStatus.FINISHED else -1
                for row, seq in enumerate(seqs)]

    def _stand_in(self, seq: Sequence, row: int) -> int:
        """Async scheduling: a placeholder for seq's token being sampled in row `row` of the step just
        launched; a sequence that this token ends for certain is scheduled no more."""
        position = seq.append_placeholder(row)
        if seq.kv_role == "prefill" or ends_by_length(seq, position + 1, self.max_model_len):
            self.scheduler.retire(seq)
        return position

    def _complete(self, step: LaunchedStep, deltas: list[RequestDelta], tokens: NewTokens) -> None:
        """Take a launched step's sampled tokens (the step's one wait for the device) and stream them:
        a request that only gained a token goes into the ``tokens`` columns, any other into ``deltas``."""
        sampled = self.runner.finish(step.pending)
        for seq, values in self.runner.finish_prompt_logprobs(step.pending):
            seq.add_prompt_logprobs(values)
        positions, max_model_len = step.positions, self.max_model_len
        column_ids, column_tokens, column_index = tokens.request_ids, tokens.token_ids, tokens.output_index
        for row, (seq, token, logprobs) in enumerate(zip(step.pending.seqs, sampled.token_ids, sampled.logprobs)):
            if seq.status is SequenceStatus.FINISHED:
                continue   # aborted, or (async scheduling) ended by the step before
            if positions is None:
                seq.append_token(token, logprobs)
                num_tokens = seq.num_tokens
            else:
                seq.fill_placeholder(positions[row], token, logprobs)
                num_tokens = positions[row] + 1
            reason = finish_reason(seq, token, num_tokens, max_model_len)
            if reason:
                self.scheduler.remove(seq)
                del self.sequences[seq.request_id]
            elif seq.kv_role == "prefill":
                self.kv_handoff.hold(seq)
            token_ids, token_logprobs = seq.take_pending()
            output_index = num_tokens - seq.num_prompt_tokens - len(token_ids)
            if (not reason and token_logprobs is None and output_index and len(token_ids) == 1
                    and seq.timeline is None
                    and (seq.params.prompt_logprobs is None or seq.prompt_logprobs_sent)):
                column_ids.append(seq.request_id)
                column_tokens.append(token_ids[0])
                column_index.append(output_index)
                continue
            timings = None
            if seq.timeline is not None and not seq.timeline.first_token:
                timings = seq.timeline.report(time.monotonic())
            deltas.append(RequestDelta(seq.request_id, token_ids, token_logprobs,
                                       reason, seq.num_cached_tokens,
                                       output_index=output_index, timings=timings,
                                       prompt_logprobs=seq.take_prompt_logprobs()))


def _reaches_unencoded_item(chunk: ScheduledChunk) -> bool:
    """The chunk computes placeholders of an image its sequence holds no encoder output for."""
    seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
    return any(item.offset < end and item.end > start and item.hash not in seq.encoder_outputs
               for item in seq.mm_items)
