"""Draining: once the server is asked to stop, new work is refused while running work ends."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from streamvlm.gateway.http import error_response


class ShutdownGate:
    """Whether the server is draining, and how many HTTP requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.http_requests = 0


class RefuseWhileDraining:
    """ASGI middleware: while draining, a new HTTP request gets 503 (and its connection is
    closed); every request let in is counted until its response ends. A request still running
    when the drain ends is cancelled by the server: that is its expected end, not a crash to log."""

    def __init__(self, app: ASGIApp, gate: ShutdownGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.gate.draining:
            response = error_response("the server is shutting down", 503, "shutting_down",
                                      headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        self.gate.http_requests += 1
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.gate.draining:
                raise
        finally:
            self.gate.http_requests -= 1
