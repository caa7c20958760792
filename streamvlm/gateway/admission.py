"""Admission in turns: a burst of generation requests is taken in slices of the event loop's time,
so that the first tokens of the requests already handed to the engine go out between slices.

Every request that arrives in one read of the sockets starts in the same turn of the event loop,
and its handler runs without yielding until it has handed its prompt to the engine (parsing, chat
template, tokenizer, submission). Without turns, the output loop would fold the first tokens only
after the last handler of the burst, so every request's first token would wait for the whole
burst. With them, a request starts its admission work at once while the current turn has spent
less than ``slice_s`` on admissions, else in a later turn, in arrival order: between two turns the
loop polls the sockets, folds the step outputs waiting and sends the first events of the requests
admitted before, so request i's first token waits for the admission of the requests before it.
Served by uvicorn (``streamvlm serve``), a request takes its turn before anything else runs for it
(AdmissionGate), so that the requests still waiting cost nothing before their turn.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection, MutableMapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

# Admission work per turn of the event loop: long enough that a turn's fixed costs (a fold of the
# waiting step outputs, the wake-ups) stay small beside it, short enough that the first tokens of
# a burst's early requests go out long before its last request is admitted.
ADMISSION_SLICE_S = 0.006
# Until requests have been timed: about what a short streamed chat request takes.
INITIAL_COST_S = 0.0002


class AdmissionTurns:
    """Hands out turns to start admission work (``await turns.turn()``), in arrival order, about
    ``slice_s`` of it per turn of the event loop. One per server; requests of every route that
    generates share it."""

    def __init__(self, slice_s: float = ADMISSION_SLICE_S,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.slice_s = slice_s
        self._clock = clock
        # Admission time per request, smoothed over the gaps between requests that start one
        # after the other in a turn: how many waiting requests one turn takes.
        self.cost_s = INITIAL_COST_S
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._turn_started: float | None = None   # when the current turn's first request started
        self._last_start = 0.0
        self._turn_ending = False   # the end of the current turn is scheduled

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def turn(self) -> None:
        """Returns when the caller may start its admission work: at once while this turn has
        room, else in a later turn, after the requests that waited before it."""
        if not self._waiting and (self._turn_started is None
                                  or self._clock() - self._turn_started < self.slice_s):
            self._started()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._end_turn_soon()
        await waiter   # cancelled while waiting: _end_turn skips it
        self._started()

    def _started(self) -> None:
        now = self._clock()
        if self._turn_started is None:
            self._turn_started = now
            self._end_turn_soon()
        else:   # the request before it in this turn ran in between
            self.cost_s += 0.2 * (now - self._last_start - self.cost_s)
        self._last_start = now

    def _end_turn_soon(self) -> None:
        """The current turn ends once the loop has run what is ready now."""
        if not self._turn_ending:
            self._turn_ending = True
            asyncio.get_running_loop().call_soon(self._end_turn)

    def _end_turn(self) -> None:
        """The current turn ends. The next opens a turn of the loop later: what the loop found ready
        as this one ended (step outputs to fold) and what that wakes (the first events of the
        requests admitted before) runs first, not after the next turn's admissions."""
        self._turn_started = None
        asyncio.get_running_loop().call_soon(self._open_turn)

    def _open_turn(self) -> None:
        """Opens the next turn to as many waiting requests as fit its slice (at least one): they
        start in the loop's next turn."""
        self._turn_ending = False
        room = max(1, round(self.slice_s / max(self.cost_s, 1e-6)))
        released = 0
        while self._waiting and released < room:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                released += 1
        if self._waiting:
            self._end_turn_soon()


# Set in a request's scope by AdmissionGate once the request has its turn.
TURN_TAKEN = "streamvlm.admission_turn"


class AdmissionGate:
    """ASGI, outside everything else: a POST to one of ``paths`` (the routes that generate) takes
    its admission turn before any middleware, routing or handler runs for it, so that the
    requests of a burst still waiting for their turns cost nothing before them. The handler
    finds the turn taken (``turn_taken``) and does not wait again; where no gate runs (the app
    served some other way), it takes the turn itself."""

    def __init__(self, app: ASGIApp, turns: AdmissionTurns, paths: Collection[str]) -> None:
        self.app = app
        self.turns = turns
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            await self.turns.turn()
            scope[TURN_TAKEN] = True
        await self.app(scope, receive, send)


def turn_taken(scope: MutableMapping[str, Any]) -> bool:
    return scope.get(TURN_TAKEN, False)
