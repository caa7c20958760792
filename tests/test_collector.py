"""DeltaCollector: the hand-off from the engine core's output loop to one stream consumer."""

from __future__ import annotations

import asyncio

import pytest

from streamvlm.engine.collector import DeltaCollector
from streamvlm.engine.request_state import OutputDelta


def delta(token: int, finish_reason: str | None = None) -> OutputDelta:
    return OutputDelta("r", chr(ord("a") + token), [token], finish_reason=finish_reason)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_output_while_the_consumer_is_busy_merges_into_one_delta():
    async def main():
        collector = DeltaCollector()
        for token in range(3):
            collector.put(delta(token))
        first = await collector.get()
        waiting = asyncio.ensure_future(collector.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        collector.put(delta(3, "length"))
        return first, await waiting

    first, last = run(main())
    assert (first.text, first.token_ids, first.finish_reason) == ("abc", [0, 1, 2], None)
    assert (last.text, last.token_ids, last.finish_reason) == ("d", [3], "length")


def test_settle_gathers_output_and_ends_when_the_request_ends():
    """Output during settle() does not wake the consumer (it merges); the end does, however
    long the interval."""
    async def main():
        collector = DeltaCollector()
        settling = asyncio.ensure_future(collector.settle(3600))
        await asyncio.sleep(0)
        for token in range(3):
            collector.put(delta(token))
            await asyncio.sleep(0)
        assert not settling.done()
        collector.put(delta(3, "stop"))
        await settling
        return await collector.get()

    merged = run(main())
    assert merged.token_ids == [0, 1, 2, 3] and merged.text == "abcd"
    assert merged.finish_reason == "stop"


def test_settle_after_the_end_returns_at_once_and_errors_reach_the_consumer():
    async def main():
        ended = DeltaCollector()
        ended.put(delta(0, "stop"))
        await ended.settle(3600)
        failing = DeltaCollector()
        settling = asyncio.ensure_future(failing.settle(3600))
        await asyncio.sleep(0)
        failing.fail(RuntimeError("worker died"))
        await settling
        with pytest.raises(RuntimeError, match="worker died"):
            await failing.get()
        return await ended.get()

    assert run(main()).finish_reason == "stop"
