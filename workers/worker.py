"""The worker's step loop: requests and aborts in, one batched StepOutput per step out."""

from __future__ import annotations

from streamvlm.config import EngineConfig
from streamvlm.model_source import ModelSource
from streamvlm.protocol import (AbortRequest, AddRequest, RequestDelta, StepOutput,
                                StepStats)
from workers.kv_cache import BlockPool
from workers.model_runner import ModelRunner
from workers.multimodal import MultiModalInput
from workers.scheduler import Scheduler
from workers.sequence import Sequence


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.runner = ModelRunner(config, source, max_model_len)
        capacity = self.runner.num_blocks * config.block_size
        if capacity < max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.runner.num_blocks} blocks of "
                f"{config.block_size}), fewer than max_model_len={max_model_len}: raise "
                f"num_kv_blocks or lower max_model_len")
        self.pool = BlockPool(self.runner.num_blocks, config.block_size,
                              config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.sequences: dict[str, Sequence] = {}
        self.num_steps = 0
        self._arrivals = 0
        self._pending_deltas: list[RequestDelta] = []

    def handle(self, message: AddRequest | AbortRequest) -> None:
        if isinstance(message, AddRequest):
            self.add_request(message)
        else:
            self.abort(message.request_ids)

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
            seq = self.sequences.pop(request_id, None)
            if seq is not None:
                self.scheduler.remove(seq)
                self._pending_deltas.append(RequestDelta(request_id, [], finish_reason="abort"))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending_deltas)

    def step(self) -> StepOutput:
        deltas, self._pending_deltas = self._pending_deltas, []
        plan = self.scheduler.schedule()
        if plan.chunks and self.runner.supports_images and not self.config.skip_model_forward:
            failed = self.runner.encode_pending(plan.chunks)
            for seq, error in failed.items():
                self.scheduler.remove(seq)
                del self.sequences[seq.request_id]
                deltas.append(RequestDelta(seq.request_id, [], finish_reason="error", error=error))
            plan.chunks = [c for c in plan.chunks if c.seq not in failed]
        if plan.chunks:
            pending = self.runner.launch(plan.chunks)
            # While the device runs the step: what does not need its tokens.
            for chunk in plan.chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
                self.pool.register_full_blocks(chunk.seq)
                if chunk.seq.encoder_outputs:
                    chunk.seq.release_encoder_outputs()
            sampled = self.runner.finish(pending)
            for seq, token, logprobs in zip(pending.seqs, sampled.token_ids, sampled.logprobs):
                seq.append_token(token, logprobs)
                finish_reason = self._finish_reason(seq, token)
                if finish_reason:
                    self.scheduler.remove(seq)
                    del self.sequences[seq.request_id]
                token_ids, token_logprobs = seq.take_pending()
                deltas.append(RequestDelta(seq.request_id, token_ids, token_logprobs,
                                           finish_reason, seq.num_cached_tokens))
        self.num_steps += 1
        return StepOutput(step=self.num_steps, deltas=deltas, stats=StepStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_scheduled_tokens=plan.num_tokens,
            num_free_blocks=self.pool.num_free_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_total_blocks=self.pool.num_blocks,
            num_preempted=plan.num_preempted,
            encoder_cache_hits=self.runner.encoder_cache.hits,
            num_encoded_items=self.runner.num_encoded_items,
        ))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in seq.stop_token_ids or (token in seq.eos_token_ids and not p.ignore_eos):
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
