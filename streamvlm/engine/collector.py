"""Per-request hand-off from the engine core's output loop to one stream consumer.

The producer never waits: output that arrives while the consumer is busy merges into a single
pending delta, so a slow consumer costs one delta of memory, not an unbounded queue.
"""

from __future__ import annotations

import asyncio

from streamvlm.engine.request_state import OutputDelta


class DeltaCollector:
    __slots__ = ("_pending", "_error", "_ready")

    def __init__(self) -> None:
        self._pending: OutputDelta | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, delta: OutputDelta) -> None:
        if self._pending is None:
            self._pending = delta
        else:
            self._pending.merge(delta)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> OutputDelta:
        while self._pending is None:
            if self._error is not None:
                raise self._error
            await self._ready.wait()
            self._ready.clear()
        delta, self._pending = self._pending, None
        return delta
