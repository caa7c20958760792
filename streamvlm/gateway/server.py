"""The gateway's uvicorn server: the connection guards uvicorn lacks, and a draining shutdown."""

from __future__ import annotations

import asyncio
import functools
import socket
from types import FrameType
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from streamvlm.gateway.admission import AdmissionGate
from streamvlm.gateway.http import GENERATION_PATHS
from streamvlm.gateway.settings import GatewaySettings
from streamvlm.gateway.shutdown import ShutdownGate

_OVER_CAPACITY_BODY = (b'{"error": {"message": "too many connections", "type": "overloaded", '
                       b'"param": null, "code": 503}}')
_OVER_CAPACITY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(_OVER_CAPACITY_BODY), _OVER_CAPACITY_BODY))


class ConnectionGuards:
    """Two guards uvicorn's HTTP protocols lack, mixed into one of them (GuardedH11Protocol,
    GuardedHttpToolsProtocol).

    A connection beyond ``max_connections`` gets a 503 and is closed at once: uvicorn's own
    limit_concurrency answers 503 only to a request, leaving a silent connection its file
    descriptor. And a request head must be complete within ``header_timeout_s`` of the
    connection opening or of the previous response, else the connection is closed: uvicorn
    times out only idle keep-alive connections, so a client that sends nothing, or a head
    byte by byte (slowloris), could hold a connection forever.
    """

    # Set by the uvicorn protocol this is mixed into.
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    logger: Any

    def __init__(self, *args: Any, max_connections: int, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.header_timer: asyncio.TimerHandle | None = None

    def awaiting_head(self) -> bool:
        """No whole request head has arrived since the connection opened or the last response."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:
            self.logger.warning("over max_connections (%d): connection refused",
                                self.max_connections)
            transport.write(_OVER_CAPACITY)
            transport.close()
            return
        self._time_next_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._time_next_head()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # The connection is a WebSocket's from here on: its own timeouts apply.
        self._stop_header_timer()
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _time_next_head(self) -> None:
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self.header_timer = None
        if self.awaiting_head() and not self.transport.is_closing():
            self.transport.close()


class GuardedH11Protocol(ConnectionGuards, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the connection guards."""

    def awaiting_head(self) -> bool:
        # IDLE: h11 has not yet parsed a whole request head on this connection (cycle).
        return self.conn.their_state is h11.IDLE


class HeadWithBody:
    """The transport of one HTTP response, as its RequestResponseCycle uses it: the head (the
    cycle's first write: status line and headers) waits for the end of the event loop's current
    turn, and goes out in one write with the body written meanwhile. A response writes its head
    and the first part of its body one after the other (an SSE stream's head and first events
    too): one system call rather than two."""

    __slots__ = ("transport", "loop", "held", "first")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None
        self.first = True

    def write(self, data: bytes) -> None:
        if self.first:
            self.first = False
            self.held = data
            self.loop.call_soon(self.flush)
            return
        held = self.held
        if held is not None:
            self.held = None
            data = held + data
        self.transport.write(data)

    def flush(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def _httptools_protocol() -> type | None:
    """uvicorn's httptools protocol with the connection guards, where httptools is installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(ConnectionGuards, HttpToolsProtocol):
        """uvicorn's httptools protocol (a C parser; responses written without a Python state
        machine) with the connection guards."""

        def awaiting_head(self) -> bool:
            # A request whose head is complete has a cycle until its response is complete (a
            # pipelined one replaces the running cycle at once).
            return self.cycle is None or self.cycle.response_complete

        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not None and self.cycle is not before:   # a request, not an upgrade
                self.cycle.transport = HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]

    return GuardedHttpToolsProtocol


GuardedHttpToolsProtocol = _httptools_protocol()


def http_protocol() -> type:
    """The gateway's HTTP/1.1 protocol: httptools where installed (less CPU time per request:
    the head parsed in C, responses written without h11's state machine), else h11."""
    return GuardedHttpToolsProtocol or GuardedH11Protocol


class GatewayServer(uvicorn.Server):
    """uvicorn.Server that drains before it stops.

    On SIGTERM/SIGINT (or ``should_exit``) new work is refused at once (HTTP 503, WebSocket
    ``shutting_down``) while the listening socket stays open to say so; running HTTP requests
    and WebSocket chats get ``shutdown_timeout_s`` to end; then uvicorn's own shutdown closes
    every connection, cancels the requests left (aborting them in the engine) and the app's
    lifespan cancels the chats left and stops the engine. A second signal, SIGTERM included,
    skips the waiting.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette, settings: GatewaySettings
                 ) -> None:
        super().__init__(config)
        self.app = app
        self.settings = settings

    @property
    def gate(self) -> ShutdownGate:
        return self.app.state.shutdown_gate

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded for uvicorn to re-raise after the shutdown: the process exits normally.
        if self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True
            self.gate.draining = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gate.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout_s
        while self._work_in_flight() and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # What is left of the budget, and a moment for idle connections to close.
        self.config.timeout_graceful_shutdown = max(0.5, deadline - loop.time())
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown on a second signal, leaving it to be cancelled with the
            # event loop: stop the chats and the engine here, in order, as the first signal would.
            await self.lifespan.shutdown()

    def _work_in_flight(self) -> bool:
        chats = getattr(self.app.state, "chats", None)
        return self.gate.http_requests > 0 or (chats is not None and chats.running() > 0)


def server_config(app: Starlette, settings: GatewaySettings, *, host: str = "127.0.0.1",
                  port: int = 0, log_level: str = "info", loop: str = "auto") -> uvicorn.Config:
    # Requests to the routes that generate take their admission turns before Starlette's
    # middleware and routing run for them.
    gated = AdmissionGate(app, app.state.admission, GENERATION_PATHS)
    return uvicorn.Config(
        gated, host=host, port=port, loop=loop, ws="websockets-sansio", lifespan="on",
        http=functools.partial(http_protocol(), max_connections=settings.max_connections,
                               header_timeout_s=settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        # Above our own limit, so that the endpoint answers an oversize message with an error
        # event instead of uvicorn closing the socket.
        ws_max_size=2 * settings.ws_max_message_bytes,
        log_level=log_level)
