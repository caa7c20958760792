"""AsyncEngine: the engine core. One asyncio process that owns every request from arrival to
its last delta, and talks to worker groups over ZeroMQ.

    async with AsyncEngine(EngineConfig(model=...)) as engine:
        async for delta in engine.stream("Hello", SamplingParams(max_tokens=32)):
            print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from streamvlm.contract.config import EngineConfig, resolve
from streamvlm.contract.families import served_family
from streamvlm.contract.generation_defaults import sampling_defaults
from streamvlm.contract.model_source import resolve_model
from streamvlm.contract.protocol import AddRequest, RequestDelta, StepOutput, WorkerFailed
from streamvlm.contract.sampling import UINT64_MAX, SamplingParams
from streamvlm.engine.byte_level import ByteLevelVocab
from streamvlm.engine import gc_policy
from streamvlm.engine.collector import DeltaCollector
from streamvlm.engine.disaggregation import connect_kv_peers, send_split
from streamvlm.engine.group_health import GroupWatch, HealthReport
from streamvlm.engine.remote_workers import RemoteWorkerGroup, WorkerListener
from streamvlm.engine.request_state import OutputDelta, RequestState
from streamvlm.engine.request_table import RequestTable, TrackedRequest
from streamvlm.engine.request_timing import CoreStamps
from streamvlm.engine.structured_output import compile_structured_outputs
from streamvlm.engine.router import Route, Router
from streamvlm.engine.worker_client import WorkerGroupClient
from streamvlm.engine.worker_group import WorkerGroup
from streamvlm.errors import EngineDeadError, EngineOverloadedError
from streamvlm.inputs.processor import InputProcessor, Message, PreparedPrompt, Prompt
from streamvlm.metrics import EngineMetrics, EngineStats
from streamvlm.outputs import RequestOutput

EnginePrompt = Prompt | list[Message] | PreparedPrompt
# Text prompts up to this many characters (chat messages: their contents together) are tokenized,
# chat template included, on the event loop: it takes about as long as handing them to the
# executor, and under load an executor thread waits up to the GIL's switch interval for its turn,
# which a burst of requests would pay once per request.
INLINE_PROMPT_CHARS = 4096
# A group's output loop folds the step outputs already waiting in one batch, without yielding:
# at most this many, and no more once they hold this many request deltas. While a burst of
# requests is admitted the worker keeps stepping the first ones, so the backlog is many small
# steps with the later requests' first tokens at its end: folded in one pass, every request gets
# one delta and every first token goes out in the same round of wake-ups, instead of waiting
# behind batches of the early requests' tokens. The delta bound keeps one pass short.
MAX_DRAIN_MESSAGES = 4096
MAX_DRAIN_DELTAS = 32768
# An overloaded engine frees a slot when some request ends: typically within a second or so.
OVERLOADED_RETRY_AFTER_S = 1.0


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample ``index`` of a request for n samples: one sample, its own seed. Only the first
    computes prompt logprobs (the prompt is the same), so the others take its prefix blocks."""
    if not index:
        return msgspec.structs.replace(params, n=1)
    seed = params.seed
    if seed is not None:
        seed = seed + index if seed + index <= UINT64_MAX else seed - index
    return msgspec.structs.replace(params, n=1, seed=seed, prompt_logprobs=None)


_PLAIN_MESSAGE_KEYS = frozenset(("role", "content", "name"))


def _short_text(prompt: Any) -> bool:
    """A text prompt, or chat messages of plain text, of at most INLINE_PROMPT_CHARS characters."""
    if isinstance(prompt, str):
        return len(prompt) <= INLINE_PROMPT_CHARS
    if not isinstance(prompt, list) or len(prompt) > 64:
        return False
    total = 0
    for message in prompt:
        if not isinstance(message, dict) or not _PLAIN_MESSAGE_KEYS.issuperset(message):
            return False
        content = message.get("content")
        if not isinstance(content, str):
            return False
        total += len(content)
    return total <= INLINE_PROMPT_CHARS


def _kill_groups(groups: list[WorkerGroup]) -> None:
    for group in groups:
        group.kill()


# The output tasks hold the engine only through a weak reference, so that an engine dropped
# without shutdown() is collected and its finalizer stops the workers.

async def _output_loop(engine_ref: weakref.ref[AsyncEngine], group: WorkerGroup) -> None:
    sock, decode = group.outbox, group.decoder.decode
    # The same socket without asyncio's futures, to take what has already arrived.
    waiting = zmq.Socket.shadow(sock.underlying)
    while True:
        messages = [decode(await sock.recv())]
        # Everything already here, up to a bound that keeps the loop responsive: a core that fell
        # behind folds several steps at once, each request's tokens merged and its consumer
        # woken once.
        num_deltas = _num_deltas(messages[0])
        while len(messages) < MAX_DRAIN_MESSAGES and num_deltas < MAX_DRAIN_DELTAS:
            try:
                messages.append(decode(waiting.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
            num_deltas += _num_deltas(messages[-1])
        group.last_heard = time.monotonic()
        engine = engine_ref()
        if engine is None:
            return
        try:
            engine._handle(group, messages)
        except Exception as exc:  # noqa: BLE001 - reported to every request the group holds
            # Without this loop nothing reaches the group's streams: they fail now rather
            # than wait forever, and the group takes no more requests.
            engine._watch.group_died(group, f"the engine core failed on its output: {exc!r}")
            return
        del engine
        # Consumers, sockets and other groups get their turn before the next batch.
        await asyncio.sleep(0)


def _num_deltas(message: Any) -> int:
    return len(message.tokens) + len(message.deltas) if isinstance(message, StepOutput) else 0


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EngineConfig.from_kwargs(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.source = resolve_model(config.model.model)
        served_family(self.source.hf_config)  # unsupported architectures fail here, not in a worker
        # Every "auto"/None the core can know, made concrete once: the input pipeline and every
        # worker group are built from this config (device settings resolve in each group).
        self.config = config = resolve(config, self.source.text_config)
        self.processor = InputProcessor(config, self.source)
        self.tokenizer = self.processor.tokenizer
        # Built now, not on the event loop when the first request arrives.
        ByteLevelVocab.of(self.tokenizer)
        # SamplingParams fields a request that leaves them unset gets (the gateway merges its
        # requests' fields over them; params=None takes them all).
        self.default_sampling_fields: dict[str, Any] = sampling_defaults(
            self.source.generation_config() if config.model.generation_config == "auto" else {},
            config.model.override_generation_config)
        self.groups: list[WorkerGroup] = []
        self._listener: WorkerListener | None = None
        self._num_preparing = 0   # requests in _submit not yet in _requests
        self._tasks: list[asyncio.Task] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._dead: EngineDeadError | None = None
        self._started = False
        self._gc_hold: weakref.finalize | None = None   # started: counted by gc_policy until shutdown
        self._finalizer: weakref.finalize | None = None
        self._num_steps = 0
        self._disaggregated = False   # prefill and decode groups instead of mixed ones
        self.metrics = EngineMetrics()   # Prometheus text via streamvlm.metrics.render_metrics
        self.router = Router(config.cache.block_size, config.parallel.worker_step_timeout_s)
        self._requests = RequestTable(self.router, self.metrics, config.parallel.kv_transfer_timeout_s)
        self._watch = GroupWatch(config.parallel.worker_step_timeout_s, self._on_group_death)

    @classmethod
    def from_config(cls, path: str, **overrides: Any) -> AsyncEngine:
        return cls(EngineConfig.from_toml(path, **overrides))

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._ctx = zmq.asyncio.Context()
        specs = self.config.parallel.group_specs
        remote = [RemoteWorkerGroup(len(specs) + i, self.config, self._ctx)
                  for i in range(self.config.parallel.remote_worker_groups)]
        self.groups = [*(WorkerGroupClient(i, self.config, self._ctx, spec)
                         for i, spec in enumerate(specs)), *remote]
        for group in self.groups:
            self.router.add_group(group.group_id)
        self._finalizer = weakref.finalize(self, _kill_groups, list(self.groups))
        loop = asyncio.get_running_loop()
        try:
            if remote:
                self._listener = WorkerListener(self.config.parallel.worker_listen_address or "",
                                                self._ctx, remote)
                self._listener.bind()
                self._tasks.append(loop.create_task(self._listener.serve()))
            results = await asyncio.gather(*(group.start() for group in self.groups),
                                           return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
        except BaseException:
            await self.shutdown()
            raise
        for group in self.groups:
            self._tasks.append(loop.create_task(_output_loop(weakref.ref(self), group)))
            self._watch.watch(group, loop)
        prefill = [g for g in self.groups if g.role == "prefill"]
        self._disaggregated = bool(prefill)
        connect_kv_peers(prefill, [g for g in self.groups if g.role == "decode"])
        gc_policy.serving_started()
        # Released by shutdown(), or when a started engine is dropped without it.
        self._gc_hold = weakref.finalize(self, gc_policy.serving_stopped)

    @property
    def worker_listen_address(self) -> str | None:
        """Where remote worker groups join, as bound: with port 0 in the config's
        worker_listen_address, the port the OS picked. None until start() has bound it (start()
        then waits for the workers to join)."""
        return self._listener.bound_address if self._listener is not None else None

    async def shutdown(self) -> None:
        if self._gc_hold is not None:
            self._gc_hold()   # once: a finalizer runs at most one time
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._listener is not None:
            self._listener.close()
        for group in self.groups:
            group.unwatch()
            await group.shutdown()
        self._requests.fail_all(EngineDeadError("the engine was shut down"))
        self.processor.multimodal.close()
        if self._dead is None:
            self._dead = EngineDeadError("the engine was shut down")
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ---- requests --------------------------------------------------------------------------

    async def stream(self, prompt: EnginePrompt, params: SamplingParams | None = None,
                     request_id: str | None = None, *, collect_timings: bool = False,
                     coalesce_s: float = 0.0) -> AsyncIterator[OutputDelta]:
        """Deltas of one request as they are produced; leaving early aborts the request. With
        ``collect_timings`` the first token's delta carries ``timings`` (RequestTimings): where
        its time to first token went.

        Without ``coalesce_s`` a delta comes as soon as the consumer asks and output is there
        (a consumer that fell behind gets everything since in one delta). With it, deltas after
        the first come at most once per ``coalesce_s`` seconds, each carrying all the output
        since the previous one: fewer, larger deltas (less work per token for whatever sends
        them on) for up to ``coalesce_s`` more latency per token."""
        request_id, tracked = await self._submit(prompt, params, request_id, collect_timings)
        collector = tracked.collector
        finished = False
        try:
            while not finished:
                delta = await collector.get()
                finished = delta.finish_reason is not None
                yield delta
                if coalesce_s > 0 and not finished:
                    await collector.settle(coalesce_s)
        finally:
            if not finished:
                self._requests.end(request_id, "abort")

    async def generate(self, prompt: EnginePrompt, params: SamplingParams | None = None,
                       request_id: str | None = None, *, collect_timings: bool = False
                       ) -> RequestOutput:
        request_id, tracked = await self._submit(prompt, params, request_id, collect_timings)
        finished = False
        try:
            while not finished:
                finished = (await tracked.collector.get()).finish_reason is not None
        finally:
            if not finished:
                self._requests.end(request_id, "abort")
        return tracked.state.output

    async def stream_choices(self, prompt: EnginePrompt, params: SamplingParams | None = None,
                             request_id: str | None = None, *, coalesce_s: float = 0.0
                             ) -> AsyncIterator[tuple[int, OutputDelta]]:
        """Deltas of the ``params.n`` samples of one prompt, each with its choice index; the
        stream ends when every choice has finished, and leaving early aborts them all.

        Sample i is request ``{request_id}-{i}`` with seed ``seed + i`` (when seeded). The prompt
        is prepared once; the first sample runs alone until its prompt is computed (its first
        delta), then the others start and find the prompt's full KV blocks in the prefix cache:
        the blocks are shared by refcount, and only the last partial block is recomputed.
        ``coalesce_s`` applies to each sample's deltas as in stream()."""
        params = SamplingParams(**self.default_sampling_fields) if params is None else params
        self._check_alive()
        self.processor.validate_params(params)
        prepared = await self.prepare_prompt(prompt)
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue[tuple[int, OutputDelta | BaseException]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for delta in self.stream(prepared, _choice_params(params, index),
                                               f"{request_id}-{index}", coalesce_s=coalesce_s):
                    queue.put_nowait((index, delta))
            except Exception as exc:
                queue.put_nowait((index, exc))

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(pump(0))]
        unfinished = params.n
        try:
            while unfinished:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if len(tasks) == 1:
                    if item.finish_reason in ("abort", "error"):
                        # The first sample ended before its prompt was computed: the others,
                        # never started, end the same way.
                        for i in range(1, params.n):
                            yield i, OutputDelta(f"{request_id}-{i}", "", [],
                                                 finish_reason=item.finish_reason, error=item.error)
                        yield index, item
                        return
                    tasks.extend(loop.create_task(pump(i)) for i in range(1, params.n))
                if item.finish_reason is not None:
                    unfinished -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def generate_choices(self, prompt: EnginePrompt, params: SamplingParams | None = None,
                               request_id: str | None = None) -> list[RequestOutput]:
        """The ``params.n`` samples of one prompt (see stream_choices), in choice order; with
        prompt logprobs, each output holds the first sample's."""
        request_id = request_id or uuid.uuid4().hex
        if params is not None:
            self.processor.validate_params(params)
        prepared = await self.prepare_prompt(prompt)
        merged: dict[int, OutputDelta] = {}
        async for index, delta in self.stream_choices(prepared, params, request_id):
            if index in merged:
                merged[index].merge(delta)
            else:
                merged[index] = OutputDelta(delta.request_id, delta.text, list(delta.token_ids),
                                            None if delta.logprobs is None else list(delta.logprobs),
                                            delta.finish_reason, delta.error, delta.usage,
                                            prompt_logprobs=delta.prompt_logprobs)
        prompt_logprobs = merged[0].prompt_logprobs if 0 in merged else None
        outputs = []
        for index in sorted(merged):
            d = merged[index]
            cached = d.usage.cached_tokens if d.usage is not None else 0
            outputs.append(RequestOutput(f"{request_id}-{index}", list(prepared.prompt_token_ids),
                                         d.token_ids,
                                         d.text, d.finish_reason, cached, d.logprobs, d.error,
                                         prompt_logprobs=prompt_logprobs))
        return outputs

    async def abort(self, request_id: str) -> None:
        """End a request now: its stream gets a last delta with finish_reason "abort"."""
        tracked = self._requests.end(request_id, "abort")
        if tracked is not None:
            out = tracked.state.apply(RequestDelta(request_id, [], finish_reason="abort"))
            if out is not None:
                tracked.collector.put(out)

    async def stats(self) -> EngineStats:
        live = [g for g in self.groups if g.alive]
        return EngineStats(
            num_running=sum(g.stats.num_running for g in live),
            num_waiting=sum(g.stats.num_waiting for g in live),
            kv_blocks_total=sum(g.stats.num_total_blocks for g in live),
            kv_blocks_used=sum(g.stats.num_used_blocks for g in live),
            num_requests=len(self._requests),
            num_steps=self._num_steps,
            encoder_cache_hits=sum(g.stats.encoder_cache_hits for g in live),
            num_encoded_items=sum(g.stats.num_encoded_items for g in live),
            kv_transfers=self.metrics.kv_transfers,
            kv_transfer_bytes=self.metrics.kv_transfer_bytes,
            kv_transfer_seconds=self.metrics.kv_transfer.sum,
        )

    async def health(self) -> HealthReport:
        return self._watch.report(self.groups, self.router, self._started and self._dead is None)

    async def tokenize(self, prompt: EnginePrompt) -> list[int]:
        """Prompt to token ids (image placeholders expanded), off the event loop where
        templating, tokenizing or image work is needed."""
        return (await self.prepare_prompt(prompt)).prompt_token_ids

    async def prepare_prompt(self, prompt: EnginePrompt,
                             chat_template_kwargs: dict[str, Any] | None = None,
                             tools: list[dict[str, Any]] | None = None) -> PreparedPrompt:
        """Token ids and images of a prompt, loaded and preprocessed; ValueError names what is
        wrong with it. ``chat_template_kwargs`` are variables for the chat template of a list of
        messages (such as ``{"enable_thinking": False}``); ``tools`` (OpenAI's tool definitions)
        go to the template as its ``tools``."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        if (isinstance(prompt, dict) and "prompt_token_ids" in prompt and not prompt.get("images")
                and not chat_template_kwargs and not tools):
            return PreparedPrompt(self.processor.tokenize_prompt(prompt))
        if not tools and _short_text(prompt):
            return PreparedPrompt(self.processor.split_prompt(prompt, chat_template_kwargs)[0])
        loop = asyncio.get_running_loop()
        ids, refs = await loop.run_in_executor(None, self.processor.split_prompt, prompt,
                                               chat_template_kwargs, tools)
        ids, items = await self.processor.multimodal.build(ids, refs)
        return PreparedPrompt(ids, items)

    async def _submit(self, prompt: EnginePrompt, params: SamplingParams | None,
                      request_id: str | None, collect_timings: bool = False
                      ) -> tuple[str, TrackedRequest]:
        arrival = time.monotonic()
        self._check_alive()
        self._admit()
        # Counted from here on, so that prompts in preparation are bounded too; it becomes a
        # tracked request below with no await in between.
        self._num_preparing += 1
        try:
            params = SamplingParams(**self.default_sampling_fields) if params is None else params
            # The prompt-free checks first: a request with bad parameters costs no image decoding.
            self.processor.validate_params(params)
            if params.n != 1:
                raise ValueError("n > 1 asks for several samples: use stream_choices or "
                                 "generate_choices")
            params = self.processor.resolve_bad_words(params)
            grammar = ""
            if params.structured_outputs is not None:
                grammar = await asyncio.get_running_loop().run_in_executor(
                    None, compile_structured_outputs, params.structured_outputs)
            prepared = await self.prepare_prompt(prompt)
            prepared_at = time.monotonic()
            prompt_token_ids = prepared.prompt_token_ids
            self.processor.validate(prompt_token_ids, params)
            self._check_alive()
            if request_id is None:
                request_id = uuid.uuid4().hex
            elif not isinstance(request_id, str) or not request_id:
                raise ValueError("request_id must be a non-empty string")
            elif request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self._disaggregated:
                route = Route(prefill=self.router.pick(self.groups, prompt_token_ids, "prefill"),
                              group=self.router.pick(self.groups, prompt_token_ids, "decode"))
            else:
                route = Route(self.router.pick(self.groups, prompt_token_ids, "mixed"))
        finally:
            self._num_preparing -= 1
        tracked = TrackedRequest(RequestState(request_id, prompt_token_ids, params, self.tokenizer),
                                 DeltaCollector(), route, arrival)
        self._requests.add(request_id, tracked)
        self.metrics.request_received(len(prompt_token_ids))
        # From here on the request is tracked: whatever fails withdraws it.
        try:
            request = AddRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                 params=params, eos_token_ids=self.processor.eos_token_ids,
                                 mm_items=prepared.mm_items, collect_timings=collect_timings,
                                 grammar=grammar)
            if collect_timings:
                # Stamped before the send: a worker thread may take the request before send()
                # returns, and encoding the message is part of the way to the worker.
                tracked.stamps = CoreStamps(arrival, prepared_at, time.monotonic())
            if route.prefill is None:
                route.group.send(request)
            else:
                send_split(request, route)
        except Exception as exc:
            self._requests.withdraw(request_id)
            raise RuntimeError(f"request {request_id!r} could not be handed to the workers: "
                               f"{exc!r}") from exc
        return request_id, tracked

    def _admit(self) -> None:
        """Refuse a request beyond max_pending_requests (tracked ones and those in preparation)."""
        pending = len(self._requests) + self._num_preparing
        limit = self.config.limits.max_pending_requests
        if pending >= limit:
            raise EngineOverloadedError(
                f"the engine holds {pending} requests, its limit (max_pending_requests="
                f"{limit}): try again later", retry_after=OVERLOADED_RETRY_AFTER_S)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if not self._started:
            raise RuntimeError("the engine is not started: use `async with engine` or "
                               "`await engine.start()`")

    # ---- output path -----------------------------------------------------------------------

    def _handle(self, group: WorkerGroup, messages: list[Any]) -> None:
        """Messages from ``group``, in the order it sent them."""
        steps: list[StepOutput] = []
        for message in messages:
            if isinstance(message, StepOutput):
                steps.append(message)
            elif isinstance(message, WorkerFailed):
                self._apply_steps(group, steps)
                steps = []
                self._watch.group_died(group, f"{message.error_type}: {message.message}")
        self._apply_steps(group, steps)

    def _apply_steps(self, group: WorkerGroup, steps: list[StepOutput]) -> None:
        if not steps:
            return
        for message in steps:
            stats = group.stats = message.stats
            if stats.num_preempted:
                self.metrics.num_preemptions += stats.num_preempted
        self._num_steps += len(steps)
        # One clock read per batch: every delta in it reaches its consumer now.
        self._requests.apply(group, steps, time.monotonic())

    def _on_group_death(self, group: WorkerGroup, error: EngineDeadError) -> None:
        self._requests.fail_held_by(group, error)
        if not any(g.alive for g in self.groups):
            self._dead = error
