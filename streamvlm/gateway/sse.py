"""Streaming an HTTP response from the task that serves its request: server-sent events, and
the watch that ends that task when the client disconnects.

Everything runs in the request's own task, from reading the body to the last event: a burst of
requests is admitted one after the other in arrival order, each handed to the engine without
waiting behind the others' work, and a stream costs one extra task (the watch), not a task
group per response.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.types import Receive, Scope, Send

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache")]


class ClientWatch:
    """Cancels the task serving an HTTP request when its client disconnects, so that whatever
    that task awaits (an engine call, a stream) ends and aborts its engine requests. ``gone``
    tells such a cancellation from any other; ``close`` ends the watch."""

    __slots__ = ("_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.gone = False
        self._watcher: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._watcher = None
        self._task.cancel()

    def close(self) -> None:
        """Stop watching; a response that completes is no disconnect (the server then reports
        one to receive())."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def absorb(self) -> bool:
        """Called on CancelledError: True if the client left, the cancellation the watch made
        taken back (the caller ends quietly); False for any other (the caller re-raises it)."""
        if not self.gone:
            return False
        # Python 3.11+ counts cancellation requests; 3.10 keeps no count to take back.
        uncancel = getattr(self._task, "uncancel", None)
        if uncancel is not None:
            uncancel()
        return True


class LastEvents(bytes):
    """The last events of a stream: EventStream sends them with the end of the response, in one
    write."""

    __slots__ = ()


class EventStream:
    """An ASGI response of server-sent events: each item of ``events`` is one or more complete
    events, sent as it comes; a LastEvents item is the last, sent with the end of the response.
    It ends ``watch`` before its last message; a client that leaves meanwhile ends it quietly,
    and closing ``events`` aborts what feeds them."""

    def __init__(self, events: AsyncIterator[bytes], watch: ClientWatch) -> None:
        self.events = events
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if not self.watch.absorb():
                raise
        except OSError:   # the connection broke under a write
            pass

    async def _stream(self, send: Send) -> None:
        events = self.events
        last = b""
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for event in events:
                if type(event) is LastEvents:
                    last = event
                    break
                await send({"type": "http.response.body", "body": event, "more_body": True})
        finally:
            self.watch.close()
            with contextlib.suppress(RuntimeError):   # closed while running, where it was cancelled
                await events.aclose()
        await send({"type": "http.response.body", "body": bytes(last), "more_body": False})
