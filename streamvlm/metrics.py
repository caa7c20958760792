"""Engine metrics in the Prometheus text format, for a ``/metrics`` endpoint.

    body, content_type = await render_metrics(engine)        # what the HTTP route serves

The engine core keeps the numbers in plain Python objects (`EngineMetrics`), updated on the
event loop as requests arrive, produce tokens and end; nothing is converted to Prometheus
objects until a scrape. That keeps the per-token cost to a few float ops: no locks, no
prometheus_client calls, no allocation. Each engine has its own `CollectorRegistry`
(`engine.metrics.registry`), so several engines in one process never collide; code that wants
more metrics on the same page registers them there.

Metrics (all names start with ``streamvlm:``, like vLLM's ``vllm:``):

counters
  streamvlm:requests_received_total        requests registered by the engine (input that fails
                                           validation is not counted)
  streamvlm:requests_finished_total{finish_reason=stop|length|abort|error}
                                           requests that ended; "abort" includes consumers that
                                           left a stream early, "error" includes requests failed
                                           by a dead worker group or by shutdown. At any moment
                                           received == sum(finished) + num_requests_tracked.
  streamvlm:prompt_tokens_total            prompt tokens of received requests (counted when the
                                           request is registered)
  streamvlm:generation_tokens_total        output tokens delivered to requests (counted as they
                                           arrive; tokens cut off by a stop string are not)
  streamvlm:prefix_cache_hit_tokens_total  prompt tokens served from the prefix cache (counted
                                           when the request ends)
  streamvlm:num_preemptions_total          requests preempted by the workers' schedulers
  streamvlm:engine_steps_total             step outputs received from workers
  streamvlm:kv_transfers_total             prefill -> decode KV handoffs completed
  streamvlm:kv_transfer_bytes_total        bytes of KV blocks they moved (blocks the decode group
                                           already cached are not sent)
histograms (seconds; times are taken on the engine core's event loop, once per step output)
  streamvlm:time_to_first_token_seconds    submission (entry to engine.stream/generate, so
                                           tokenization and chat templating count) to the first
                                           delta that carries tokens
  streamvlm:inter_token_latency_seconds    one observation per output token after the first.
                                           A delta carrying n tokens that arrives dt after the
                                           request's previous token-bearing delta counts as n
                                           observations of dt / n (sum += dt). Tokens that come
                                           in the same delta as the first token count as gaps of
                                           0. So count == generation tokens - requests that got
                                           >= 1 token, and sum == time from each request's first
                                           token to its last.
  streamvlm:e2e_request_latency_seconds    submission to the end of the request, whatever the
                                           finish reason (count == sum of requests_finished)
  streamvlm:kv_transfer_seconds            a handoff: the prefill group's first token to the
                                           decode group holding the KV (bandwidth = bytes_total /
                                           this histogram's sum)
gauges (read from the workers' latest step stats at scrape time)
  streamvlm:num_requests_running, streamvlm:num_requests_waiting
  streamvlm:num_requests_tracked           requests the engine core is tracking
  streamvlm:kv_cache_usage                 kv_cache_blocks_used / kv_cache_blocks_total (0..1)
  streamvlm:kv_cache_blocks_used, streamvlm:kv_cache_blocks_total
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any, Protocol

import msgspec

PREFIX = "streamvlm:"
FINISH_REASONS = ("stop", "length", "abort", "error")
# The classic Prometheus text format (what prometheus_client.generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                       5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


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


_ZERO_STATS = SimpleNamespace(num_running=0, num_waiting=0, kv_blocks_total=0, kv_blocks_used=0,
                              num_requests=0, num_steps=0)


class Histogram:
    """Bucket counts (not cumulative; the last one is +Inf) and a sum. ``observe(x, n)`` counts
    n observations of x."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n   # le is inclusive
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as HistogramMetricFamily takes them."""
        from prometheus_client.utils import floatToGoString

        out, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            out.append((floatToGoString(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class EngineMetrics:
    """What one engine core counts. Updated on the event loop only (no locks)."""

    def __init__(self) -> None:
        self.requests_received = 0
        self.requests_finished = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.num_preemptions = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.kv_transfers = 0
        self.kv_transfer_bytes = 0
        self.kv_transfer = Histogram(KV_TRANSFER_BUCKETS)
        self._registry: Any = None
        self._stats: Any = None

    # ---- hooks the engine calls ------------------------------------------------------------

    def tokens_arrived(self, num_tokens: int, arrival: float, last_token: float,
                       now: float) -> None:
        """A delta of num_tokens reached its consumer at ``now``. The first one of a request
        gives its time to first token; later ones count as num_tokens inter-token gaps of
        (now - last_token) / num_tokens each."""
        self.generation_tokens += num_tokens
        if last_token:
            self.itl.observe((now - last_token) / num_tokens, num_tokens)
        else:
            self.first_token(now - arrival, num_tokens)

    def request_received(self, num_prompt_tokens: int) -> None:
        self.requests_received += 1
        self.prompt_tokens += num_prompt_tokens

    def first_token(self, seconds: float, num_tokens: int) -> None:
        self.ttft.observe(seconds)
        if num_tokens > 1:
            self.itl.observe(0.0, num_tokens - 1)

    def kv_transferred(self, num_bytes: int, seconds: float) -> None:
        self.kv_transfers += 1
        self.kv_transfer_bytes += num_bytes
        self.kv_transfer.observe(seconds)

    def request_finished(self, finish_reason: str, seconds: float, num_cached_tokens: int) -> None:
        finished = self.requests_finished
        finished[finish_reason] = finished.get(finish_reason, 0) + 1
        self.e2e.observe(seconds)
        self.prefix_cache_hit_tokens += num_cached_tokens

    # ---- exposition -------------------------------------------------------------------------

    @property
    def registry(self) -> Any:
        """This engine's prometheus_client CollectorRegistry (made on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
            self._registry.register(self)
        return self._registry

    def render(self, stats: EngineStats) -> bytes:
        """The Prometheus text page, gauges taken from ``stats`` (``await engine.stats()``)."""
        from prometheus_client import generate_latest

        self._stats = stats
        try:
            return generate_latest(self.registry)
        finally:
            self._stats = None

    def collect(self) -> Iterator[Any]:
        """The registry's view: counters and histograms always, gauges within render()."""
        return self._families(self._stats)

    def describe(self) -> Iterator[Any]:
        """Every family this collector yields (the registry checks names against it)."""
        return self._families(_ZERO_STATS)

    def _families(self, stats: Any) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield counter("requests_received", "Requests registered by the engine.",
                      self.requests_received)
        finished = CounterMetricFamily(PREFIX + "requests_finished",
                                       "Requests that ended, by finish reason.",
                                       labels=["finish_reason"])
        for reason, value in self.requests_finished.items():
            finished.add_metric([reason], value)
        yield finished
        yield counter("prompt_tokens", "Prompt tokens of received requests.", self.prompt_tokens)
        yield counter("generation_tokens", "Output tokens delivered to requests.",
                      self.generation_tokens)
        yield counter("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                      self.prefix_cache_hit_tokens)
        yield counter("num_preemptions", "Requests preempted by the schedulers.",
                      self.num_preemptions)
        yield counter("kv_transfers", "Prefill -> decode KV handoffs completed.", self.kv_transfers)
        yield counter("kv_transfer_bytes", "Bytes of KV blocks moved from prefill to decode groups.",
                      self.kv_transfer_bytes)
        if stats is not None:
            yield counter("engine_steps", "Step outputs received from workers.", stats.num_steps)

        for name, doc, hist in (
                ("time_to_first_token_seconds",
                 "Seconds from submission to the first delta with tokens.", self.ttft),
                ("inter_token_latency_seconds",
                 "Seconds between consecutive output tokens of a request (a delta of n tokens "
                 "counts as n gaps of equal length).", self.itl),
                ("e2e_request_latency_seconds", "Seconds from submission to the end of a request.",
                 self.e2e),
                ("kv_transfer_seconds", "Seconds from a prefill group's first token to the decode "
                 "group holding the request's KV.", self.kv_transfer)):
            yield HistogramMetricFamily(PREFIX + name, doc, buckets=hist.buckets(),
                                        sum_value=hist.sum)

        if stats is None:
            return   # gauges only come from a render() with fresh stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("num_requests_running", "Requests running in the workers.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting in the workers.", stats.num_waiting)
        yield gauge("num_requests_tracked", "Requests the engine core is tracking.",
                    stats.num_requests)
        total = stats.kv_blocks_total
        yield gauge("kv_cache_usage", "Fraction of KV-cache blocks held by live requests (0..1).",
                    stats.kv_blocks_used / total if total else 0.0)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks held by live requests.",
                    stats.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the workers' pools.", total)


class MetricsSource(Protocol):
    """What a metrics page is rendered from (an AsyncEngine)."""
    metrics: EngineMetrics

    async def stats(self) -> EngineStats: ...


async def render_metrics(engine: MetricsSource) -> tuple[bytes, str]:
    """The engine's metrics page and its content type, for an HTTP ``/metrics`` route."""
    return engine.metrics.render(await engine.stats()), CONTENT_TYPE
