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
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.families import served_family
from streamvlm.engine.collector import DeltaCollector
from streamvlm.engine.request_state import OutputDelta, RequestState
from streamvlm.engine.router import pick_group, prompt_block_hashes
from streamvlm.engine.remote_workers import RemoteWorkerGroup, WorkerListener
from streamvlm.engine.worker_client import WorkerGroupClient
from streamvlm.errors import EngineDeadError, EngineOverloadedError, EngineUnresponsiveError
from streamvlm.inputs.processor import InputProcessor, Message, PreparedPrompt, Prompt
from streamvlm.metrics import EngineMetrics
from streamvlm.contract.model_source import resolve_model
from streamvlm.outputs import RequestOutput
from streamvlm.contract.protocol import (AbortRequest, AcceptKVPeers, AddRequest, ConnectKVPeers, KVEvent, ReleaseKV,
                                RequestDelta, SendKV, StepOutput, WorkerFailed)
from streamvlm.contract.sampling import SamplingParams

EnginePrompt = Prompt | list[Message] | PreparedPrompt
WorkerGroup = WorkerGroupClient | RemoteWorkerGroup
DRAIN_BUDGET_S = 0.002
REMOTE_CHECK_S = 0.1
# An overloaded engine frees a slot when some request ends: typically within a second or so.
OVERLOADED_RETRY_AFTER_S = 1.0


class EngineStats(msgspec.Struct, kw_only=True):
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    num_requests: int      # requests the engine core is tracking
    num_steps: int         # step outputs received from workers
    encoder_cache_hits: int = 0    # images whose encoder output was reused, since start
    num_encoded_items: int = 0     # images (or embeddings) run through encoders, since start
    # Disaggregated prefill/decode, since start: handoffs completed, the bytes they moved, and
    # their time from the prefill group's first token to the decode group holding the KV.
    kv_transfers: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0


class GroupHealth(msgspec.Struct, kw_only=True):
    group_id: int
    role: str = "mixed"
    pid: int | None
    alive: bool
    # Heard from within worker_step_timeout_s; an alive group that is not gets no new requests.
    responsive: bool = True
    host: str | None = None    # a remote group's host (its pid is one there)
    error: str | None = None
    num_requests: int = 0      # in flight now
    num_routed: int = 0        # ever routed to this group


class HealthReport(msgspec.Struct, kw_only=True):
    healthy: bool
    groups: list[GroupHealth]


@dataclass(slots=True)
class _Tracked:
    state: RequestState
    collector: DeltaCollector
    group: WorkerGroup
    arrival: float              # time.monotonic() on entry to _submit
    last_token: float = 0.0     # when the latest token-bearing delta arrived; 0: none yet
    # Disaggregated: the prefill group (``group`` is the decode group), until it has handed off.
    prefill: WorkerGroup | None = None
    handed_off: bool = False
    prefilled_at: float = 0.0
    transfer_timer: asyncio.TimerHandle | None = None

    def holders(self) -> list[WorkerGroup]:
        """The groups that may hold this request's blocks now."""
        if self.prefill is None or self.handed_off:
            return [self.group]
        return [self.group, self.prefill]


def _kill_groups(groups: list[WorkerGroup]) -> None:
    for group in groups:
        group.kill()


# The background tasks and callbacks below hold the engine only through a weak reference, so
# that an engine dropped without shutdown() is collected and its finalizer stops the workers.

async def _output_loop(engine_ref: weakref.ref[AsyncEngine], group: WorkerGroup) -> None:
    sock, decode = group.outbox, group.decoder.decode
    while True:
        frame: bytes | None = await sock.recv()
        # Drain what has already arrived, so a burst reaches consumers as merged deltas, but
        # for no longer than DRAIN_BUDGET_S: awaiting a message that is already there does not
        # yield, and consumers, sockets and other requests must get their turn.
        now = time.monotonic()
        group.last_heard = now
        deadline = now + DRAIN_BUDGET_S
        while frame is not None:
            engine = engine_ref()
            if engine is None:
                return
            engine._handle(group, decode(frame))
            del engine
            if time.monotonic() > deadline:
                break
            try:
                frame = await sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                frame = None
        await asyncio.sleep(0)


def _transfer_timed_out(engine_ref: weakref.ref[AsyncEngine], request_id: str) -> None:
    engine = engine_ref()
    if engine is not None:
        engine._fail_one(request_id, f"the KV transfer to the decode group did not complete in "
                                     f"{engine.config.kv_transfer_timeout_s:g} s")


def _on_group_exit(engine_ref: weakref.ref[AsyncEngine], group: WorkerGroupClient) -> None:
    engine = engine_ref()
    if engine is None:
        AsyncEngine._unwatch(group)
        return
    engine._on_exit(group)


async def _poll_group(engine_ref: weakref.ref[AsyncEngine], group: WorkerGroupClient) -> None:
    while group.process.is_alive():
        await asyncio.sleep(0.2)
        if engine_ref() is None:
            return
    engine = engine_ref()
    if engine is not None:
        engine._group_died(group, group.exit_description())


async def _watch_remote(engine_ref: weakref.ref[AsyncEngine], group: RemoteWorkerGroup) -> None:
    while group.dead_reason is None:
        await asyncio.sleep(REMOTE_CHECK_S)
        engine = engine_ref()
        if engine is None:
            return
        reason = group.failure()
        if reason is not None:
            engine._group_died(group, reason)
        del engine


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EngineConfig.from_kwargs(**overrides)
        elif overrides:
            config = msgspec.structs.replace(config, **overrides)
        self.config = config
        self.source = resolve_model(config.model)
        served_family(self.source.hf_config)  # unsupported architectures fail here, not in a worker
        self.processor = InputProcessor(config, self.source)
        self.tokenizer = self.processor.tokenizer
        self.groups: list[WorkerGroup] = []
        self._listener: WorkerListener | None = None
        self._requests: dict[str, _Tracked] = {}
        self._num_preparing = 0   # requests in _submit not yet in _requests
        self._tasks: list[asyncio.Task] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._dead: EngineDeadError | None = None
        self._started = False
        self._finalizer: weakref.finalize | None = None
        self._num_steps = 0
        self._disaggregated = False   # prefill and decode groups instead of mixed ones
        self.metrics = EngineMetrics()   # Prometheus text via streamvlm.metrics.render_metrics

    @classmethod
    def from_config(cls, path: str, **overrides: Any) -> AsyncEngine:
        return cls(EngineConfig.from_toml(path, **overrides))

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._ctx = zmq.asyncio.Context()
        specs = self.config.group_specs
        remote = [RemoteWorkerGroup(len(specs) + i, self.config, self._ctx)
                  for i in range(self.config.remote_worker_groups)]
        self.groups = [*(WorkerGroupClient(i, self.config, self._ctx, spec)
                         for i, spec in enumerate(specs)), *remote]
        self._finalizer = weakref.finalize(self, _kill_groups, list(self.groups))
        loop = asyncio.get_running_loop()
        try:
            if remote:
                self._listener = WorkerListener(self.config.worker_listen_address or "",
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
            self._watch(group, loop)
        decode, prefill = self._decode_groups, self._prefill_groups
        self._disaggregated = bool(prefill)
        inboxes = {g.group_id: g.ready.kv_address for g in decode}
        stores = {g.group_id: g.ready.kv_store_address for g in decode if g.ready.kv_store_address}
        for group in decode:
            if stores:   # kv_transport "peer": links with every prefill group
                group.send(AcceptKVPeers(prefill_groups=[g.group_id for g in prefill]))
        for group in prefill:
            group.send(ConnectKVPeers(addresses=inboxes, stores=stores))

    @property
    def worker_listen_address(self) -> str | None:
        """Where remote worker groups join, as bound: with port 0 in the config's
        worker_listen_address, the port the OS picked. None until start() has bound it (start()
        then waits for the workers to join)."""
        return self._listener.bound_address if self._listener is not None else None

    @property
    def _prefill_groups(self) -> list[WorkerGroup]:
        return [g for g in self.groups if g.role == "prefill"]

    @property
    def _decode_groups(self) -> list[WorkerGroup]:
        return [g for g in self.groups if g.role == "decode"]

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._listener is not None:
            self._listener.close()
        for group in self.groups:
            self._unwatch(group)
            await group.shutdown()
        self._fail_requests(lambda t: True, EngineDeadError("the engine was shut down"))
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
                     request_id: str | None = None) -> AsyncIterator[OutputDelta]:
        """Deltas of one request as they are produced; leaving early aborts the request."""
        request_id, tracked = await self._submit(prompt, params, request_id)
        finished = False
        try:
            while not finished:
                delta = await tracked.collector.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                self._abort_now(request_id)

    async def generate(self, prompt: EnginePrompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        request_id, tracked = await self._submit(prompt, params, request_id)
        finished = False
        try:
            while not finished:
                finished = (await tracked.collector.get()).finish_reason is not None
        finally:
            if not finished:
                self._abort_now(request_id)
        return tracked.state.output

    async def abort(self, request_id: str) -> None:
        """End a request now: its stream gets a last delta with finish_reason "abort"."""
        tracked = self._requests.get(request_id)
        self._abort_now(request_id)
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
        groups = [self._group_health(g) for g in self.groups]
        healthy = self._started and self._dead is None and all(g.alive and g.responsive for g in groups)
        return HealthReport(healthy=healthy, groups=groups)

    def _group_health(self, group: WorkerGroup) -> GroupHealth:
        responsive = not group.alive or group.responsive
        error = group.dead_reason
        if not responsive:
            error = (f"no progress for {group.silent_for:.0f} s "
                     f"(worker_step_timeout_s={self.config.worker_step_timeout_s:g})")
        return GroupHealth(group_id=group.group_id, role=group.role, pid=group.pid, alive=group.alive,
                           responsive=responsive, host=group.host, error=error,
                           num_requests=group.load.num_requests, num_routed=group.load.num_routed)

    async def tokenize(self, prompt: EnginePrompt) -> list[int]:
        """Prompt to token ids (image placeholders expanded), off the event loop where
        templating, tokenizing or image work is needed."""
        return (await self.prepare_prompt(prompt)).prompt_token_ids

    async def prepare_prompt(self, prompt: EnginePrompt) -> PreparedPrompt:
        """Token ids and images of a prompt, loaded and preprocessed; ValueError names what is
        wrong with it."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt and not prompt.get("images"):
            return PreparedPrompt(self.processor.tokenize_prompt(prompt))
        loop = asyncio.get_running_loop()
        ids, refs = await loop.run_in_executor(None, self.processor.split_prompt, prompt)
        ids, items = await self.processor.multimodal.build(ids, refs)
        return PreparedPrompt(ids, items)

    async def _submit(self, prompt: EnginePrompt, params: SamplingParams | None,
                      request_id: str | None) -> tuple[str, _Tracked]:
        arrival = time.monotonic()
        self._check_alive()
        self._admit()
        # Counted from here on, so that prompts in preparation are bounded too; it becomes a
        # tracked request below with no await in between.
        self._num_preparing += 1
        try:
            params = SamplingParams() if params is None else params
            # The prompt-free checks first: a request with bad parameters costs no image decoding.
            self.processor.validate_params(params)
            prepared = await self.prepare_prompt(prompt)
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
                prefill = self._route(prompt_token_ids, "prefill")
                group = self._route(prompt_token_ids, "decode")
            else:
                prefill, group = None, self._route(prompt_token_ids, "mixed")
        finally:
            self._num_preparing -= 1
        tracked = _Tracked(RequestState(request_id, prompt_token_ids, params, self.tokenizer),
                           DeltaCollector(), group, arrival, prefill=prefill)
        self._requests[request_id] = tracked
        for holder in tracked.holders():
            holder.load.num_requests += 1
            holder.load.num_routed += 1
        (prefill or group).load.queued_prompt_tokens += len(prompt_token_ids)
        self.metrics.request_received(len(prompt_token_ids))
        # From here on the request is tracked: whatever fails leaves through _withdraw.
        try:
            request = AddRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                 params=params, eos_token_ids=self.processor.eos_token_ids,
                                 mm_items=prepared.mm_items)
            if prefill is None:
                group.send(request)
            else:
                # The decode group reserves blocks (and reports its cached prefix) while the
                # prefill group computes the prompt.
                group.send(msgspec.structs.replace(request, kv_role="decode"))
                prefill.send(msgspec.structs.replace(request, kv_role="prefill",
                                                     kv_peer=group.group_id))
        except Exception as exc:
            self._withdraw(request_id)
            raise RuntimeError(f"request {request_id!r} could not be handed to the workers: "
                               f"{exc!r}") from exc
        return request_id, tracked

    def _admit(self) -> None:
        """Refuse a request beyond max_pending_requests (tracked ones and those in preparation)."""
        pending = len(self._requests) + self._num_preparing
        limit = self.config.max_pending_requests
        if pending >= limit:
            raise EngineOverloadedError(
                f"the engine holds {pending} requests, its limit (max_pending_requests="
                f"{limit}): try again later", retry_after=OVERLOADED_RETRY_AFTER_S)

    def _withdraw(self, request_id: str) -> None:
        """Undo a request that _submit registered but could not hand to its groups: it leaves
        _requests and the load counters, and a group that got it already frees it."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        holders = tracked.holders()
        self._finished(tracked, "error", time.monotonic())
        for group in holders:
            group.load.num_routed -= 1
            try:
                self._release(request_id, [group])
            except Exception:  # noqa: BLE001 - the caller gets the error that brought us here
                pass

    def _route(self, prompt_token_ids: list[int], role: str) -> WorkerGroup:
        live = [g for g in self.groups if g.alive and g.role == role]
        if not live:
            raise self._dead or EngineDeadError(f"no live {role} worker group")
        live = [g for g in live if g.responsive]
        if not live:
            raise EngineUnresponsiveError(
                f"no {role} worker group is making progress: each has sent nothing for more than "
                f"worker_step_timeout_s={self.config.worker_step_timeout_s:g} s")
        if len(live) == 1:
            return live[0]
        hashes = prompt_block_hashes(prompt_token_ids, self.config.block_size)
        group = live[pick_group([g.load for g in live], hashes)]
        group.load.remember(hashes)
        return group

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if not self._started:
            raise RuntimeError("the engine is not started: use `async with engine` or "
                               "`await engine.start()`")

    def _abort_now(self, request_id: str) -> None:
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        holders = tracked.holders()
        self._finished(tracked, "abort", time.monotonic())
        self._release(request_id, holders)

    @staticmethod
    def _release(request_id: str, holders: list[WorkerGroup]) -> None:
        """Make the live groups in holders free the request's blocks."""
        for group in holders:
            if group.alive:
                group.send(AbortRequest(request_ids=[request_id]))

    def _finished(self, tracked: _Tracked, finish_reason: str, now: float) -> None:
        """Count a request that left ``_requests`` (exactly once, whichever way it ended)."""
        for holder in tracked.holders():
            holder.load.num_requests -= 1
        if tracked.transfer_timer is not None:
            tracked.transfer_timer.cancel()
        if not tracked.last_token:
            (tracked.prefill or tracked.group).load.queued_prompt_tokens -= len(
                tracked.state.output.prompt_token_ids)
        self.metrics.request_finished(finish_reason, now - tracked.arrival,
                                      tracked.state.output.num_cached_tokens)

    # ---- output path -----------------------------------------------------------------------

    def _handle(self, group: WorkerGroup, message: Any) -> None:
        if isinstance(message, WorkerFailed):
            self._group_died(group, f"{message.error_type}: {message.message}")
            return
        if not isinstance(message, StepOutput):
            return
        stats = group.stats = message.stats
        self._num_steps += 1
        metrics = self.metrics
        if stats.num_preempted:
            metrics.num_preemptions += stats.num_preempted
        # One clock read per step output: every delta in it reaches its consumer now.
        now = time.monotonic()
        requests = self._requests
        for d in message.deltas:
            tracked = requests.get(d.request_id)
            if tracked is None:
                continue   # aborted or already finished here (e.g. by a stop string)
            try:
                out = tracked.state.apply(d)
            except Exception as exc:  # noqa: BLE001 - one broken request must not stop the rest
                del requests[d.request_id]
                self._finished(tracked, "error", now)
                group.send(AbortRequest(request_ids=[d.request_id]))
                tracked.collector.fail(RuntimeError(f"output processing failed: {exc!r}"))
                continue
            if out is None:
                continue
            if out.token_ids:
                metrics.tokens_arrived(len(out.token_ids), tracked.arrival,
                                       tracked.last_token, now)
                if not tracked.last_token:   # prefilled: no longer queued work
                    (tracked.prefill or tracked.group).load.queued_prompt_tokens -= len(
                        tracked.state.output.prompt_token_ids)
                tracked.last_token = now
            if out.finish_reason is not None:
                holders = tracked.holders()
                del requests[d.request_id]
                self._finished(tracked, out.finish_reason, now)
                # The group that ended it has freed its blocks, unless a stop string ended it
                # here; any other holder (a decode group still waiting for the KV) has not.
                self._release(d.request_id, [g for g in holders
                                             if g is not group or d.finish_reason is None])
            tracked.collector.put(out)
        for event in message.kv_events:
            self._kv_event(group, event, now)

    # ---- disaggregated prefill/decode ------------------------------------------------------

    def _kv_event(self, group: WorkerGroup, event: KVEvent, now: float) -> None:
        tracked = self._requests.get(event.request_id)
        if tracked is None or tracked.prefill is None:
            return   # ended meanwhile: both sides were told to free it
        if event.kind == "reserved":
            tracked.prefill.send(SendKV(request_id=event.request_id, skip_blocks=event.cached_blocks))
        elif event.kind == "prefilled" and not tracked.handed_off:   # not overtaken by "received"
            tracked.prefilled_at = now
            tracked.transfer_timer = asyncio.get_running_loop().call_later(
                self.config.kv_transfer_timeout_s, _transfer_timed_out, weakref.ref(self),
                event.request_id)
        elif event.kind == "received":
            tracked.prefill.send(ReleaseKV(request_id=event.request_id))
            tracked.prefill.load.num_requests -= 1
            tracked.handed_off = True
            if tracked.transfer_timer is not None:
                tracked.transfer_timer.cancel()
                tracked.transfer_timer = None
            self.metrics.kv_transferred(event.num_bytes, now - (tracked.prefilled_at or now))
        elif event.kind == "failed":
            self._fail_one(event.request_id, event.error or "KV transfer failed")

    def _fail_one(self, request_id: str, error: str) -> None:
        """End one request with an error; the groups holding it free its blocks."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        holders = tracked.holders()
        self._finished(tracked, "error", time.monotonic())
        self._release(request_id, holders)
        out = tracked.state.apply(RequestDelta(request_id, [], finish_reason="error", error=error))
        if out is not None:
            tracked.collector.put(out)

    # ---- health ----------------------------------------------------------------------------

    def _watch(self, group: WorkerGroup, loop: asyncio.AbstractEventLoop) -> None:
        if isinstance(group, RemoteWorkerGroup):   # no process here: liveness is heard
            self._tasks.append(loop.create_task(_watch_remote(weakref.ref(self), group)))
            return
        if getattr(group.process, "sentinel", None) is None:   # thread backend
            self._tasks.append(loop.create_task(_poll_group(weakref.ref(self), group)))
            return
        for process in group.processes:
            # Readable the moment the process ends, however it ends.
            loop.add_reader(process.sentinel, _on_group_exit, weakref.ref(self), group)

    @staticmethod
    def _unwatch(group: WorkerGroup) -> None:
        for process in group.processes:
            try:
                sentinel = getattr(process, "sentinel", None)
            except ValueError:   # the process never started
                continue
            if sentinel is not None:
                try:
                    asyncio.get_running_loop().remove_reader(sentinel)
                except (RuntimeError, ValueError, OSError):
                    pass

    def _on_exit(self, group: WorkerGroupClient) -> None:
        self._unwatch(group)
        reason = group.exit_description()
        group.kill_processes()
        self._group_died(group, reason)

    def _group_died(self, group: WorkerGroup, reason: str) -> None:
        if group.dead_reason is not None:
            return
        group.mark_dead(reason)
        error = EngineDeadError(f"worker group {group.group_id} died: {reason}")
        # Requests it held fail; the other group of a prefill/decode pair frees their blocks. So
        # do those whose first token it had not delivered yet: the decode group's tokens wait
        # for it (the core streams tokens in order).
        def lost(t: _Tracked) -> bool:
            return group in t.holders() or (t.prefill is group and not t.last_token)
        affected = [(rid, t.holders()) for rid, t in self._requests.items() if lost(t)]
        self._fail_requests(lost, error)
        for request_id, holders in affected:
            self._release(request_id, [g for g in holders if g is not group])
        if not any(g.alive for g in self.groups):
            self._dead = error

    def _fail_requests(self, which: Any, error: EngineDeadError) -> None:
        now = time.monotonic()
        for request_id, tracked in list(self._requests.items()):
            if which(tracked):
                del self._requests[request_id]
                self._finished(tracked, "error", now)
                tracked.collector.fail(error)
