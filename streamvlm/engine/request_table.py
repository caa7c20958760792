"""The requests the engine core tracks, from registration to their end: step outputs applied to
them, their KV handoffs, and the one way they end (``RequestTable.end``)."""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass

from streamvlm.contract.protocol import AbortRequest, KVEvent, RequestDelta, StepOutput
from streamvlm.engine.collector import DeltaCollector
from streamvlm.engine.disaggregation import KVHandoffs
from streamvlm.engine.request_timing import CoreStamps, RequestTimings
from streamvlm.engine.request_state import RequestState
from streamvlm.engine.router import Route, Router
from streamvlm.engine.worker_group import WorkerGroup
from streamvlm.metrics import EngineMetrics


@dataclass(slots=True)
class TrackedRequest:
    state: RequestState
    collector: DeltaCollector
    route: Route
    arrival: float              # time.monotonic() on entry to the engine
    last_token: float = 0.0     # when the latest token-bearing delta arrived; 0: none yet
    stamps: CoreStamps | None = None   # collect_timings requests


@dataclass(slots=True)
class _Run:
    """A request's tokens that follow each other over the step outputs being applied."""

    first_index: int      # output index of token_ids[0]
    token_ids: list[int]
    next_index: int       # of the token that would extend the run

    def delta(self, request_id: str) -> RequestDelta:
        return RequestDelta(request_id, self.token_ids, output_index=self.first_index)


def _shared_columns_end(messages: list[StepOutput], start: int) -> int:
    """The end of the messages from ``start`` on whose token columns begin with those of
    ``messages[start]``: the same requests in the same order, each at its next token. In steady
    decoding a step runs the batch of the step before (and any requests that joined it, at its
    end), so the first columns of a backlog of steps are the same requests: their tokens are taken
    a request at a time rather than a token at a time. A message with KV events ends the span."""
    first = messages[start]
    if first.kv_events:
        return start + 1
    request_ids, expected = first.tokens.request_ids, first.tokens.output_index
    width = len(request_ids)
    if not width:
        return start + 1
    ones = [1] * width
    end = start + 1
    while end < len(messages):
        message = messages[end]
        columns = message.tokens
        if message.kv_events or columns.request_ids[:width] != request_ids:
            break
        expected = list(map(operator.add, expected, ones))
        if columns.output_index[:width] != expected:
            break
        end += 1
    return end


class RequestTable:
    def __init__(self, router: Router, metrics: EngineMetrics, kv_transfer_timeout_s: float) -> None:
        self._router = router
        self._metrics = metrics
        self._requests: dict[str, TrackedRequest] = {}
        self._handoffs = KVHandoffs(kv_transfer_timeout_s, router, metrics,
                                    lambda request_id, error: self.end(request_id, "error", error=error))

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, tracked: TrackedRequest) -> None:
        self._requests[request_id] = tracked
        self._router.routed(tracked.route, len(tracked.state.output.prompt_token_ids))

    def end(self, request_id: str, reason: str, *, error: str | BaseException | None = None,
            release: list[WorkerGroup] | None = None, now: float | None = None) -> TrackedRequest | None:
        """The one way a request leaves the table (None if it already has): it is counted as
        finished, the live groups in ``release`` (default: every group holding it) free its
        blocks, and its consumer gets ``error``: a message ends its stream with an "error" delta,
        an exception is raised to it. The caller delivers any other last delta."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return None
        route = tracked.route
        holders = route.holders() if release is None else release
        self._router.finished(route, len(tracked.state.output.prompt_token_ids),
                              prefilled=bool(tracked.last_token))
        self._handoffs.forget(request_id)
        now = time.monotonic() if now is None else now
        self._metrics.request_finished(reason, now - tracked.arrival,
                                       tracked.state.output.num_cached_tokens)
        for group in holders:
            if group.alive:
                try:
                    group.send(AbortRequest(request_ids=[request_id]))
                except Exception:  # noqa: BLE001 - a group that cannot take it is failing anyway
                    pass
        if isinstance(error, BaseException):
            tracked.collector.fail(error)
        elif error is not None:
            out = tracked.state.apply(RequestDelta(request_id, [], finish_reason=reason, error=error))
            if out is not None:
                tracked.collector.put(out)
        return tracked

    def withdraw(self, request_id: str) -> None:
        """Undo a request that was added but could not be handed to its groups: it ends, it does
        not count as routed, and a group that got it already frees it."""
        tracked = self.end(request_id, "error")
        if tracked is not None:
            self._router.unrouted(tracked.route)

    def apply(self, group: WorkerGroup, messages: list[StepOutput], now: float) -> None:
        """Step outputs from ``group``, in step order, received at ``now``: each request's new
        tokens over all of them reach its consumer as one delta where they follow each other, so
        that a core that fell behind by several steps folds and wakes each request once."""
        runs: dict[str, _Run] = {}
        start, count = 0, len(messages)
        while start < count:
            end = _shared_columns_end(messages, start)
            if end - start > 1:
                self._add_shared_columns(group, runs, messages[start:end], now)
                skip = len(messages[start].tokens)
            else:
                skip = 0
            for message in messages[start:end]:
                self._add_message(group, runs, message, skip, now)
                if message.kv_events:
                    self._fold_runs(group, runs, now)
                    runs = {}
                    self._apply_kv_events(message.kv_events, now)
            start = end
        self._fold_runs(group, runs, now)

    def _add_shared_columns(self, group: WorkerGroup, runs: dict[str, _Run],
                            block: list[StepOutput], now: float) -> None:
        """The requests in the first columns of every message of ``block`` (see
        _shared_columns_end): each one's tokens of the whole block, taken at once."""
        first = block[0].tokens
        width, steps = len(first), len(block)
        columns = zip(*[message.tokens.token_ids[:width] for message in block])
        for request_id, index, token_ids in zip(first.request_ids, first.output_index, columns):
            run = runs.get(request_id)
            if run is not None and run.next_index == index:
                run.token_ids.extend(token_ids)
                run.next_index += steps
                continue
            if run is not None:   # not the token after the run's: the run first, then a new one
                self._fold(group, run.delta(request_id), now)
            runs[request_id] = _Run(index, list(token_ids), index + steps)

    def _add_message(self, group: WorkerGroup, runs: dict[str, _Run], message: StepOutput,
                     skip: int, now: float) -> None:
        """One message's tokens (past its first ``skip`` columns, taken already) and deltas."""
        columns = message.tokens
        request_ids, token_ids, output_index = columns.request_ids, columns.token_ids, columns.output_index
        if skip:
            request_ids, token_ids, output_index = request_ids[skip:], token_ids[skip:], output_index[skip:]
        for request_id, token, index in zip(request_ids, token_ids, output_index):
            run = runs.get(request_id)
            if run is None:
                runs[request_id] = _Run(index, [token], index + 1)
            elif run.next_index == index:
                run.token_ids.append(token)
                run.next_index += 1
            else:   # not the token after the run's: the run first, then a new one
                self._fold(group, run.delta(request_id), now)
                runs[request_id] = _Run(index, [token], index + 1)
        for delta in message.deltas:
            run = runs.pop(delta.request_id, None)
            if run is not None:
                self._fold(group, run.delta(delta.request_id), now)
            self._fold(group, delta, now)

    def _fold_runs(self, group: WorkerGroup, runs: dict[str, _Run], now: float) -> None:
        for request_id, run in runs.items():
            self._fold(group, run.delta(request_id), now)

    def _fold(self, group: WorkerGroup, d: RequestDelta, now: float) -> None:
        """One request's delta from ``group`` to its consumer."""
        tracked = self._requests.get(d.request_id)
        if tracked is None:
            return   # aborted or already finished here (e.g. by a stop string)
        try:
            out = tracked.state.apply(d)
        except Exception as exc:  # noqa: BLE001 - one broken request must not stop the rest
            self.end(d.request_id, "error", release=[group], now=now,
                     error=RuntimeError(f"output processing failed: {exc!r}"))
            return
        if out is None:
            return
        if d.timings is not None and tracked.stamps is not None and tracked.state.output.timings is None:
            out.timings = tracked.state.output.timings = RequestTimings.place(
                tracked.stamps, d.timings, now, clock_shared=group.host is None)
        if out.token_ids:
            self._metrics.tokens_arrived(len(out.token_ids), tracked.arrival, tracked.last_token, now)
            if not tracked.last_token:
                self._router.prefilled(tracked.route, len(tracked.state.output.prompt_token_ids))
            tracked.last_token = now
        if out.finish_reason is not None:
            # The group that ended it has freed its blocks, unless a stop string ended it
            # here; any other holder (a decode group still waiting for the KV) has not.
            self.end(d.request_id, out.finish_reason, now=now,
                     release=[g for g in tracked.route.holders()
                              if g is not group or d.finish_reason is None])
        tracked.collector.put(out)

    def _apply_kv_events(self, events: list[KVEvent], now: float) -> None:
        for event in events:
            tracked = self._requests.get(event.request_id)
            if tracked is not None and tracked.route.prefill is not None:
                self._handoffs.on_event(event, tracked.route, now)
            # else: ended meanwhile, and both sides were told to free it

    def fail_all(self, error: BaseException) -> None:
        """Every request fails; no group is told (they are gone)."""
        for request_id in list(self._requests):
            self.end(request_id, "error", error=error, release=[])

    def fail_held_by(self, group: WorkerGroup, error: BaseException) -> None:
        """``group`` died: the requests it held fail, and the other group of a prefill/decode
        pair frees their blocks. So do those whose first token it had not delivered yet: the
        decode group's tokens wait for it (the core streams tokens in order)."""
        lost = [(request_id, t.route.holders()) for request_id, t in self._requests.items()
                if group in t.route.holders() or (t.route.prefill is group and not t.last_token)]
        for request_id, holders in lost:
            self.end(request_id, "error", error=error, release=[g for g in holders if g is not group])
