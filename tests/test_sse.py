"""The SSE response and the client watch (gateway/sse.py) with a fake ASGI server: no sockets."""

from __future__ import annotations

import asyncio

import pytest

from streamvlm.gateway.server import HeadWithBody
from streamvlm.gateway.sse import ClientWatch, EventStream, LastEvents


class FakeClient:
    """receive() blocks until leave(); send() records the messages."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        await self.left.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.left.set()

    async def send(self, message: dict) -> None:
        self.sent.append(message)


class Events:
    """An event source that records whether it was closed, fed by ``feed``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def __aiter__(self):
        try:
            while (item := await self.queue.get()) is not None:
                yield item
        finally:
            self.closed = True


async def _serve(client: FakeClient, events: Events) -> None:
    """As the server's request task runs it: the watch made in the task that streams."""
    watch = ClientWatch(client.receive)
    await EventStream(events.__aiter__(), watch)({"type": "http"}, client.receive, client.send)


def test_events_are_sent_in_order_then_the_end() -> None:
    async def main() -> None:
        client, events = FakeClient(), Events()
        for item in (b"data: 1\n\n", b"data: 2\n\n", None):
            events.queue.put_nowait(item)
        await _serve(client, events)
        assert client.sent[0]["type"] == "http.response.start"
        assert client.sent[0]["status"] == 200
        assert [m["body"] for m in client.sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
        assert [m["more_body"] for m in client.sent[1:]] == [True, True, False]
        assert events.closed

    asyncio.run(main())


def test_last_events_end_the_response_in_the_same_message() -> None:
    async def main() -> None:
        client, events = FakeClient(), Events()
        for item in (b"data: 1\n\n", LastEvents(b"data: 2\n\ndata: [DONE]\n\n")):
            events.queue.put_nowait(item)
        await _serve(client, events)
        assert [m["body"] for m in client.sent[1:]] == [b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n"]
        assert [m["more_body"] for m in client.sent[1:]] == [True, False]
        assert type(client.sent[-1]["body"]) is bytes
        assert events.closed

    asyncio.run(main())


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_a_response_head_goes_out_with_the_body_written_in_the_same_turn() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport = FakeTransport()
        response = HeadWithBody(transport, loop)   # type: ignore[arg-type]
        response.write(b"head")
        response.write(b"body 1")
        assert transport.writes == [b"headbody 1"]
        await asyncio.sleep(0)
        response.write(b"body 2")
        assert transport.writes == [b"headbody 1", b"body 2"]

        alone = FakeTransport()   # a head and nothing after it in this turn: sent on its own
        response = HeadWithBody(alone, loop)   # type: ignore[arg-type]
        response.write(b"head")
        assert alone.writes == []
        await asyncio.sleep(0)
        assert alone.writes == [b"head"]
        response.write(b"body")
        assert alone.writes == [b"head", b"body"]

        closed = FakeTransport()   # closing sends the head first
        response = HeadWithBody(closed, loop)   # type: ignore[arg-type]
        response.write(b"head")
        response.close()
        assert closed.writes == [b"head"] and closed.closed
        await asyncio.sleep(0)
        assert closed.writes == [b"head"]

    asyncio.run(main())


def test_a_client_that_leaves_ends_the_stream_quietly_and_closes_its_source() -> None:
    async def main() -> None:
        client, events = FakeClient(), Events()
        events.queue.put_nowait(b"data: 1\n\n")
        task = asyncio.get_running_loop().create_task(_serve(client, events))
        while len(client.sent) < 2:
            await asyncio.sleep(0)
        client.leave()
        await asyncio.wait_for(task, 5)   # returns: no CancelledError leaks to the server
        assert not task.cancelled()
        assert events.closed
        assert not any(m.get("more_body") is False for m in client.sent)   # never completed

    asyncio.run(main())


def test_a_cancellation_that_is_not_a_disconnect_propagates() -> None:
    async def main() -> None:
        client, events = FakeClient(), Events()
        task = asyncio.get_running_loop().create_task(_serve(client, events))
        while not client.sent:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert events.closed

    asyncio.run(main())


def test_a_watch_closed_in_time_cancels_nothing() -> None:
    async def main() -> None:
        client = FakeClient()

        async def request() -> str:
            watch = ClientWatch(client.receive)
            watch.close()
            client.leave()   # what a server reports once the response is complete
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return "done"

        assert await request() == "done"

    asyncio.run(main())
