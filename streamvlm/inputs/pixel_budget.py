"""A bound on decoded image pixels in flight across requests, so that many large images arriving at
once wait their turn instead of being decoded together."""

from __future__ import annotations

import asyncio
from collections import deque


class PixelBudget:
    """Reservations of pixels, granted first come first served on one event loop. A reservation larger
    than the whole budget is granted alone, once everything else is released."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the pixel budget must be >= 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def num_waiting(self) -> int:
        return sum(not future.done() for _, future in self._waiters)

    async def acquire(self, pixels: int) -> int:
        """Waits until ``pixels`` fit; returns the amount to hand to ``release``."""
        amount = min(pixels, self.capacity)
        if not self._waiters and self.in_use + amount <= self.capacity:
            self.in_use += amount
            return amount
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(amount)   # granted just as the waiter was cancelled
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._grant()          # the head of the queue may have been what blocked others
            raise
        return amount

    def release(self, amount: int) -> None:
        self.in_use -= amount
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.in_use + amount > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += amount
            future.set_result(None)
