"""Per-request hand-off from the engine core's output loop to one stream consumer.

The producer never waits: output that arrives while the consumer is busy merges into a single
pending delta, so a slow consumer costs one delta of memory, not an unbounded queue, and a
consumer that falls behind by several steps wakes once for all of them.
"""

from __future__ import annotations

import asyncio

from streamvlm.engine.request_state import OutputDelta


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class DeltaCollector:
    __slots__ = ("_pending", "_error", "_waiter", "_settling")

    def __init__(self) -> None:
        self._pending: OutputDelta | None = None
        self._error: BaseException | None = None
        # The consumer's future while it waits (a collector has one consumer): one future per
        # wait, resolved by the next put, is the cheapest wake-up asyncio has.
        self._waiter: asyncio.Future[None] | None = None
        self._settling = False   # the consumer waits in settle(): only the end wakes it early

    def put(self, delta: OutputDelta) -> None:
        pending = self._pending
        if pending is None:
            self._pending = delta
        else:
            pending.merge(delta)
        if not self._settling or delta.finish_reason is not None:
            self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _resolve(waiter)

    def _ended(self) -> bool:
        pending = self._pending
        return self._error is not None or (pending is not None
                                           and pending.finish_reason is not None)

    async def settle(self, seconds: float) -> None:
        """Let output gather for ``seconds`` (it merges into the pending delta); returns early
        when the request ends, so that its last delta is not held back."""
        if self._ended():
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._settling = True
        timer = loop.call_later(seconds, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._settling = False

    async def get(self) -> OutputDelta:
        while self._pending is None:
            if self._error is not None:
                raise self._error
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        delta, self._pending = self._pending, None
        return delta
