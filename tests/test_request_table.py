"""RequestTable.apply: several step outputs folded at once, each request's tokens merged."""

from __future__ import annotations

import asyncio

from streamvlm.contract.protocol import (KVEvent, NewTokens, RequestDelta, StepOutput,
                                         StepStats)
from streamvlm.contract.sampling import SamplingParams
from streamvlm.engine.collector import DeltaCollector
from streamvlm.engine.request_state import RequestState
from streamvlm.engine.request_table import RequestTable, TrackedRequest
from streamvlm.engine.router import Route, Router
from streamvlm.metrics import EngineMetrics

from tests.test_request_state import CharTokenizer, ids


class FakeGroup:
    group_id = 0
    alive = True
    host = None

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


class CountingCollector(DeltaCollector):
    __slots__ = ("puts",)

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, delta) -> None:
        self.puts += 1
        super().put(delta)


def make_table(request_ids: list[str], group: FakeGroup, max_tokens: int = 100
               ) -> tuple[RequestTable, dict[str, TrackedRequest]]:
    router = Router(16, 60.0)
    router.add_group(group.group_id)
    table = RequestTable(router, EngineMetrics(), 10.0)
    tracked = {}
    for request_id in request_ids:
        state = RequestState(request_id, ids("zz"), SamplingParams(max_tokens=max_tokens),
                             CharTokenizer())
        tracked[request_id] = TrackedRequest(state, CountingCollector(), Route(group), arrival=0.0)
        table.add(request_id, tracked[request_id])
    return table, tracked


def step(tokens: list[tuple[str, str, int]] = (), deltas: list[RequestDelta] = (),
         kv_events: list[KVEvent] = ()) -> StepOutput:
    """tokens: (request id, one letter, output index) in columns."""
    columns = NewTokens([r for r, _, _ in tokens], [ids(t)[0] for _, t, _ in tokens],
                        [i for _, _, i in tokens])
    return StepOutput(step=0, deltas=list(deltas), stats=StepStats(), tokens=columns,
                      kv_events=list(kv_events))


def take(collector: DeltaCollector):
    return asyncio.run(asyncio.wait_for(collector.get(), 10))


def test_a_batch_of_steps_reaches_each_consumer_as_one_delta():
    group = FakeGroup()
    table, tracked = make_table(["a", "b"], group)
    table.apply(group, [step(deltas=[RequestDelta("a", ids("h"), output_index=0),
                                     RequestDelta("b", ids("x"), output_index=0)]),
                        step([("a", "e", 1), ("b", "y", 1)]),
                        step([("a", "l", 2), ("b", "z", 2)]),
                        step([("a", "l", 3)])], now=1.0)
    a, b = take(tracked["a"].collector), take(tracked["b"].collector)
    assert (a.text, a.token_ids) == ("hell", ids("hell"))
    assert (b.text, b.token_ids) == ("xyz", ids("xyz"))
    # The first tokens came as deltas, the rest as one run each.
    assert tracked["a"].collector.puts == tracked["b"].collector.puts == 2
    assert tracked["a"].state.output.token_ids == ids("hell")


def test_a_full_delta_after_a_run_keeps_the_order_and_ends_the_request():
    group = FakeGroup()
    table, tracked = make_table(["a"], group)
    table.apply(group, [step(deltas=[RequestDelta("a", ids("a"), output_index=0)]),
                        step([("a", "b", 1)]),
                        step(deltas=[RequestDelta("a", ids("c"), finish_reason="length",
                                                  output_index=2)]),
                        step([("a", "d", 3)])], now=1.0)   # after the end: dropped
    out = take(tracked["a"].collector)
    assert (out.text, out.finish_reason, out.usage.completion_tokens) == ("abc", "length", 3)
    assert "a" not in table


def test_a_run_with_a_gap_is_put_back_in_order():
    group = FakeGroup()
    table, tracked = make_table(["a"], group)
    # Tokens 3..4 before 1..2 (as from two groups of a prefill/decode pair): held, then merged.
    table.apply(group, [step(deltas=[RequestDelta("a", ids("a"), output_index=0)]),
                        step([("a", "d", 3)]), step([("a", "e", 4)]),
                        step([("a", "b", 1)]), step([("a", "c", 2)])], now=1.0)
    out = take(tracked["a"].collector)
    assert (out.text, out.token_ids) == ("abcde", ids("abcde"))


def test_requests_not_in_the_table_are_skipped():
    group = FakeGroup()
    table, tracked = make_table(["a"], group)
    table.apply(group, [step([("gone", "x", 1), ("a", "b", 0)],
                             deltas=[RequestDelta("a2", [], finish_reason="abort")])], now=1.0)
    assert take(tracked["a"].collector).token_ids == ids("b")


class TokenByTokenTable(RequestTable):
    """The reference: every column token taken on its own."""

    def apply(self, group, messages, now):
        runs = {}
        for message in messages:
            self._add_message(group, runs, message, 0, now)
            if message.kv_events:
                self._fold_runs(group, runs, now)
                runs = {}
                self._apply_kv_events(message.kv_events, now)
        self._fold_runs(group, runs, now)


def test_steps_sharing_their_first_columns_fold_as_token_by_token():
    """Backlogs whose steps run the same requests first (with requests joining, first tokens as
    deltas, gaps in a request's tokens, requests ending) reach each consumer as when every token
    is taken on its own: the same deltas, in the same number."""
    import copy
    import random

    rng = random.Random(7)
    for trial in range(200):
        names = [f"r{i}" for i in range(6)]
        steps, next_index, running, joined = [], {}, [], 0
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.4 and joined < len(names):   # one joins: its first token a delta
                name = names[joined]
                joined += 1
                running.append(name)
                next_index[name] = 1
                deltas = [RequestDelta(name, ids("a"), output_index=0)]
            else:
                deltas = []
            columns = []
            for name in running:
                if any(d.request_id == name for d in deltas):
                    continue
                if rng.random() < 0.05:
                    next_index[name] += 1   # a gap: the tokens after it wait for the missing one
                columns.append((name, rng.choice("bcd"), next_index[name]))
                next_index[name] += 1
            if running and rng.random() < 0.1 and not any(d.request_id == running[-1] for d in deltas):
                name = running.pop()   # the last one ends: its last token a delta
                columns = [c for c in columns if c[0] != name]
                next_index[name] -= 1
                deltas.append(RequestDelta(name, ids("e"), finish_reason="length",
                                           output_index=next_index[name]))
            steps.append(step(columns, deltas))

        group = FakeGroup()
        table, tracked = make_table(names, group)
        original = copy.deepcopy(steps)   # folding hands the deltas' token lists on
        table.apply(group, steps, now=1.0)
        reference = make_table(names, group)[1]
        reference_table = TokenByTokenTable(Router(16, 60.0), EngineMetrics(), 10.0)
        reference_table._router.add_group(group.group_id)
        for name, request in reference.items():
            reference_table.add(name, request)
        reference_table.apply(group, copy.deepcopy(original), now=1.0)
        for name in names:
            got, want = tracked[name], reference[name]
            assert got.state.output.token_ids == want.state.output.token_ids, (trial, name)
            assert got.collector.puts == want.collector.puts, (trial, name)
            got, want = got.collector._pending, want.collector._pending
            assert (got is None) == (want is None), (trial, name)
            if got is not None:
                assert (got.text, got.token_ids, got.finish_reason) == \
                       (want.text, want.token_ids, want.finish_reason), (trial, name)
