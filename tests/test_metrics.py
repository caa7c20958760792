"""Prometheus metrics of the engine core (streamvlm.metrics), on a tiny random Llama with the
worker in a thread of the test process. One module event loop (uvloop); one module engine, on
which each test checks the increase it caused.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers import run
from prometheus_client.parser import text_string_to_metric_families

import streamvlm.engine.async_engine as async_engine_module
from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.request_table import TrackedRequest
from streamvlm.engine.collector import DeltaCollector
from streamvlm.engine.request_state import RequestState
from streamvlm.errors import EngineDeadError
from streamvlm.metrics import CONTENT_TYPE, ITL_BUCKETS, render_metrics
from streamvlm.engine.router import Route
from streamvlm.contract.protocol import RequestDelta, StepOutput, StepStats
from streamvlm.contract.sampling import SamplingParams

BLOCK_SIZE = 16
ENGINE_KW = dict(device="cpu", max_model_len=256, block_size=BLOCK_SIZE, worker_backend="thread")
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
P = "streamvlm:"


async def start_engine(model) -> AsyncEngine:
    engine = AsyncEngine(model=str(model), **ENGINE_KW)
    await engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(loop, llama_path):
    engine = run(loop, start_engine(llama_path))
    yield engine
    run(loop, engine.shutdown())


async def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = await engine.stats()
        if s.num_requests == s.num_running == s.num_waiting == s.kv_blocks_used == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {await engine.stats()}")


class Scrape:
    """One parsed /metrics page: ``value(name, **labels)`` and histogram parts."""

    def __init__(self, body: bytes) -> None:
        self.text = body.decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in self.families.values() for s in f.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(P + name, tuple(sorted(labels.items())))]

    def hist(self, name: str) -> tuple[float, float, list[tuple[float, float]]]:
        """count, sum and the cumulative buckets (le, count) of a histogram."""
        family = self.families[P + name]
        assert family.type == "histogram"
        buckets = [(float(s.labels["le"]), s.value) for s in family.samples
                   if s.name.endswith("_bucket")]
        return self.value(name + "_count"), self.value(name + "_sum"), buckets


async def scrape(engine: AsyncEngine) -> Scrape:
    body, content_type = await render_metrics(engine)
    assert content_type == CONTENT_TYPE
    return Scrape(body)


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def check_histogram(scrape: Scrape, name: str) -> None:
    count, total, buckets = scrape.hist(name)
    les = [le for le, _ in buckets]
    counts = [c for _, c in buckets]
    assert les == sorted(les) and les[-1] == float("inf")
    assert counts == sorted(counts) and counts[-1] == count
    assert total >= 0


# ---- the page itself ----------------------------------------------------------------------

def test_fresh_engine_page_has_every_metric_at_zero(loop, llama_path):
    async def scenario():
        fresh = await start_engine(llama_path)
        try:
            return await scrape(fresh)
        finally:
            await fresh.shutdown()

    page = run(loop, scenario())
    names = {name for (name, _) in page.samples}
    for counter in ("requests_received", "prompt_tokens", "generation_tokens",
                    "prefix_cache_hit_tokens", "num_preemptions", "engine_steps"):
        assert page.families[P + counter].type == "counter"
        assert P + counter + "_total" in names
    for reason in ("stop", "length", "abort", "error"):
        assert page.value("requests_finished_total", finish_reason=reason) == 0
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds"):
        assert page.hist(hist)[0] == 0
        check_histogram(page, hist)
    assert page.value("requests_received_total") == 0
    assert page.value("generation_tokens_total") == 0
    for gauge in ("num_requests_running", "num_requests_waiting", "num_requests_tracked",
                  "kv_cache_usage", "kv_cache_blocks_used", "kv_cache_blocks_total"):
        assert page.families[P + gauge].type == "gauge"
    assert page.value("kv_cache_blocks_total") > 0
    assert page.value("kv_cache_usage") == page.value("kv_cache_blocks_used") == 0
    # Every family carries the prefix; nothing else is on the page.
    assert all(name.startswith(P) for name in page.families)


# ---- counts against the requests' own usage -----------------------------------------------

def test_counters_and_histograms_match_the_requests(loop, engine):
    shared = list(range(40, 80))   # 40 tokens: a second request reuses its 2 full blocks

    async def scenario():
        before = await scrape(engine)
        # Which token greedy decoding produces 3rd, to end a request by a stop token id.
        probe = await engine.generate({"prompt_token_ids": [5, 6, 7]},
                                      SamplingParams(temperature=0.0, max_tokens=3,
                                                     ignore_eos=True))
        stop_params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                                     stop_token_ids=[probe.token_ids[-1]])

        finals = [probe]
        finals += await asyncio.gather(
            engine.generate({"prompt_token_ids": [5, 6, 7]}, stop_params),
            engine.generate("Hello world! This is", SamplingParams(temperature=0.0, max_tokens=7,
                                                                 ignore_eos=True)),
            engine.generate({"prompt_token_ids": shared},
                            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)))
        finals.append(await engine.generate({"prompt_token_ids": shared},
                                            SamplingParams(temperature=0.0, max_tokens=5,
                                                           ignore_eos=True)))

        # One aborted by engine.abort() after a few deltas.
        got = asyncio.Event()
        aborted = []

        async def consume():
            async for d in engine.stream({"prompt_token_ids": [9, 10]}, LONG, request_id="ab"):
                aborted.append(d)
                if sum(len(x.token_ids) for x in aborted) >= 3:
                    got.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(got.wait(), 10)
        await engine.abort("ab")
        await asyncio.wait_for(task, 5)

        # Input that fails validation is never received.
        with pytest.raises(ValueError):
            await engine.generate({"prompt_token_ids": []})

        await wait_idle(engine)
        return before, finals, aborted, await scrape(engine)

    before, finals, aborted, after = run(loop, scenario())

    assert [f.finish_reason for f in finals] == ["length", "stop", "length", "length", "length"]
    assert aborted[-1].finish_reason == "abort"
    usages = [(len(f.prompt_token_ids), len(f.token_ids), f.num_cached_tokens) for f in finals]
    u = aborted[-1].usage
    usages.append((u.prompt_tokens, u.completion_tokens, u.cached_tokens))
    assert finals[-1].num_cached_tokens == 2 * BLOCK_SIZE   # the shared prefix hit the cache

    n = len(usages)
    assert delta(after, before, "requests_received_total") == n
    assert delta(after, before, "requests_finished_total", finish_reason="length") == 4
    assert delta(after, before, "requests_finished_total", finish_reason="stop") == 1
    assert delta(after, before, "requests_finished_total", finish_reason="abort") == 1
    assert delta(after, before, "requests_finished_total", finish_reason="error") == 0
    assert delta(after, before, "prompt_tokens_total") == sum(p for p, _, _ in usages)
    assert delta(after, before, "generation_tokens_total") == sum(c for _, c, _ in usages)
    assert delta(after, before, "prefix_cache_hit_tokens_total") == sum(h for _, _, h in usages)
    assert delta(after, before, "engine_steps_total") > 0

    with_tokens = sum(1 for _, c, _ in usages if c >= 1)
    total_tokens = sum(c for _, c, _ in usages)
    ttft_count, ttft_sum, _ = after.hist("time_to_first_token_seconds")
    itl_count, itl_sum, _ = after.hist("inter_token_latency_seconds")
    e2e_count, e2e_sum, _ = after.hist("e2e_request_latency_seconds")
    assert ttft_count - before.hist("time_to_first_token_seconds")[0] == with_tokens
    assert itl_count - before.hist("inter_token_latency_seconds")[0] == total_tokens - with_tokens
    assert e2e_count - before.hist("e2e_request_latency_seconds")[0] == n
    # Each request's first token and the gaps after it fit within its end-to-end latency.
    assert 0 < ttft_sum and 0 < itl_sum and ttft_sum + itl_sum <= e2e_sum + 1e-9
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds"):
        check_histogram(after, hist)

    # Idle again: gauges back at zero, and received == finished + tracked.
    assert after.value("num_requests_running") == after.value("num_requests_waiting") == 0
    assert after.value("num_requests_tracked") == 0
    assert after.value("kv_cache_blocks_used") == after.value("kv_cache_usage") == 0
    assert after.value("kv_cache_blocks_total") > 0
    finished = sum(after.value("requests_finished_total", finish_reason=r)
                   for r in ("stop", "length", "abort", "error"))
    assert finished == after.value("requests_received_total") == e2e_count


def test_gauges_while_a_request_runs_and_leaving_a_stream_counts_as_abort(loop, engine):
    async def scenario():
        before = await scrape(engine)
        seen = 0
        during = None
        async for d in engine.stream({"prompt_token_ids": list(range(100, 140))}, LONG):
            seen += len(d.token_ids)
            if seen >= 3:
                during = await scrape(engine)
                break
        await wait_idle(engine)
        return before, during, seen, await scrape(engine)

    before, during, seen, after = run(loop, scenario())
    assert during.value("num_requests_tracked") == 1
    assert during.value("num_requests_running") == 1
    assert during.value("num_requests_waiting") == 0
    used, total = during.value("kv_cache_blocks_used"), during.value("kv_cache_blocks_total")
    assert used >= 3   # 40 prompt tokens and a few outputs in blocks of 16
    assert during.value("kv_cache_usage") == pytest.approx(used / total)

    assert delta(after, before, "requests_received_total") == 1
    assert delta(after, before, "requests_finished_total", finish_reason="abort") == 1
    assert delta(after, before, "e2e_request_latency_seconds_count") == 1
    # The engine may have taken in tokens the consumer never read before it left.
    assert delta(after, before, "generation_tokens_total") >= seen
    assert after.value("num_requests_tracked") == after.value("kv_cache_blocks_used") == 0


def test_engines_keep_separate_registries_and_shutdown_counts_as_error(loop, engine, llama_path):
    async def scenario():
        main_before = await scrape(engine)
        other = await start_engine(llama_path)
        assert other.metrics.registry is not engine.metrics.registry
        got = asyncio.Event()

        async def consume():
            async for _ in other.stream({"prompt_token_ids": [3, 4]}, LONG):
                got.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(got.wait(), 10)
        await other.shutdown()   # fails the open stream
        with pytest.raises(EngineDeadError):
            await task
        return main_before, await scrape(other), await scrape(engine)

    main_before, other_page, main_after = run(loop, scenario())
    assert other_page.value("requests_received_total") == 1
    assert other_page.value("requests_finished_total", finish_reason="error") == 1
    assert other_page.value("num_requests_tracked") == 0
    assert other_page.value("kv_cache_blocks_total") == 0   # no live worker group
    assert main_after.samples == main_before.samples


# ---- inter-token latency of multi-token deltas --------------------------------------------

class _FakeGroup:
    group_id = 0
    alive = True
    stats = StepStats()

    def send(self, message) -> None:
        pass


class _Clock:
    def __init__(self) -> None:
        self.now = 1024.0   # times below are exact in binary

    def monotonic(self) -> float:
        return self.now


def test_a_delta_of_n_tokens_counts_as_n_equal_gaps(loop, engine, monkeypatch):
    """Fed straight into _handle (not started, no worker) at chosen times."""
    probe = AsyncEngine(model=engine.config.model.model, **ENGINE_KW)
    clock = _Clock()
    monkeypatch.setattr(async_engine_module, "time", clock)
    group = _FakeGroup()
    state = RequestState("r", [1, 2, 3], SamplingParams(max_tokens=100), None)
    probe.router.add_group(group.group_id)
    probe._requests.add("r", TrackedRequest(state, DeltaCollector(), Route(group), arrival=clock.now))
    probe.metrics.request_received(3)

    def step(*token_ids, finish=None, dt: float, preempted: int = 0) -> None:
        clock.now += dt
        probe._handle(group, [StepOutput(step=0, deltas=[RequestDelta("r", list(token_ids),
                                                                      finish_reason=finish)],
                                         stats=StepStats(num_preempted=preempted))])

    m = probe.metrics
    step(dt=0.5)                   # no tokens: nothing observed
    assert m.ttft.count == m.itl.count == 0
    step(7, 8, 9, dt=0.25)         # first delta, 3 tokens: TTFT 0.75 and two gaps of 0
    assert (m.ttft.count, m.ttft.sum) == (1, 0.75)
    assert (m.itl.count, m.itl.sum) == (2, 0.0)
    assert m.itl.counts[0] == 2
    step(10, 11, 12, 13, dt=2.0, preempted=1)   # 4 tokens after 2 s: four gaps of 0.5
    assert (m.itl.count, m.itl.sum) == (6, 2.0)
    assert m.itl.counts[ITL_BUCKETS.index(0.5)] == 4   # le is inclusive
    step(14, dt=3.0, finish="length")
    assert (m.itl.count, m.itl.sum) == (7, 5.0)
    assert m.itl.counts[ITL_BUCKETS.index(5.0)] == 1
    assert m.generation_tokens == 8 == len(state.output.token_ids)
    assert m.num_preemptions == 1
    assert m.requests_finished["length"] == 1
    assert (m.e2e.count, m.e2e.sum) == (1, 5.75)
    assert not probe._requests

    page = Scrape(m.render(run(loop, probe.stats())))
    assert page.value("inter_token_latency_seconds_count") == 7
    assert page.value("inter_token_latency_seconds_sum") == 5.0
    assert page.value("inter_token_latency_seconds_bucket", le="0.4") == 2
    assert page.value("inter_token_latency_seconds_bucket", le="0.5") == 6
    assert page.value("inter_token_latency_seconds_bucket", le="+Inf") == 7
    assert page.value("inter_token_latency_seconds_bucket", le="0.0005") == 2
