"""The WebSocket chat stream (/v1/ws) on a real server, through the websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamvlm import AsyncEngine, EngineConfig, SamplingParams
from streamvlm.gateway import ws as gateway_ws
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.helpers import local_llm
from tests.live_server import LiveServer

KEY = "sk-ws-test"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The quick brown fox"
MAX_MESSAGE = 16 * 1024


def start_server(llama_path, **settings: Any) -> LiveServer:
    """A live gateway on the tiny llama (thread worker) with these GatewaySettings."""
    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256,
                                      worker_backend="thread"))
    return LiveServer(build_app(engine, GatewaySettings(**settings))).start()


@pytest.fixture(scope="module")
def server(llama_path):
    live = start_server(llama_path, api_key=KEY, ws_max_message_bytes=MAX_MESSAGE,
                   ws_auth_timeout_s=0.5, resume_window_s=30.0, resume_buffer_bytes=8192)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def short_server(llama_path):
    """Detached chats are cancelled half a second after their connection drops."""
    live = start_server(llama_path, resume_window_s=0.5)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference(llama_path):
    llm = local_llm(llama_path, max_model_len=256)
    yield llm
    llm.shutdown()


def greedy(reference, prompt: Any, max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if isinstance(prompt, str):
        return reference.generate(prompt, params)[0]
    return reference.chat(prompt, params)[0]


@contextlib.contextmanager
def slow_worker(live: LiveServer, seconds_per_step: float):
    """Slow the (thread) worker down, so that a chat is surely still running when the test
    drops, cancels or resumes it."""
    worker = live.app.state.engine.groups[0].local_worker
    step = worker.step

    def slow_step():
        time.sleep(seconds_per_step)
        return step()

    worker.step = slow_step
    try:
        yield
    finally:
        del worker.step


def wait_engine_idle(live: LiveServer, timeout: float = 10.0):
    engine = live.app.state.engine
    deadline = time.monotonic() + timeout
    while True:
        stats = live.call(engine.stats())
        if stats.kv_blocks_used == 0 and stats.num_requests == 0 and stats.num_running == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {stats}")
        time.sleep(0.02)


# ---- client helpers ---------------------------------------------------------------------------

def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def open_ws(live: LiveServer, key: str | None = KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return await connect(live.ws_url, additional_headers=headers, max_size=None, proxy=None)


async def send(ws, **message: Any) -> None:
    await ws.send(json.dumps(message))


async def recv(ws, timeout: float = 15.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def create(chat_id: str, prompt: Any = None, **params: Any) -> dict:
    message: dict[str, Any] = {"type": "chat.create", "id": chat_id, "params": params}
    if isinstance(prompt, str):
        message["prompt"] = prompt
    else:
        message["messages"] = prompt if prompt is not None else MESSAGES
    return message


class Chats:
    """Events per chat id, in arrival order, with the checks every chat stream must pass."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = {}
        self.order: list[dict] = []
        self.other: list[dict] = []

    def add(self, event: dict) -> None:
        if event["type"].startswith("chat.") and event.get("id") is not None:
            self.events.setdefault(event["id"], []).append(event)
            self.order.append(event)
        else:
            self.other.append(event)

    def done(self, chat_id: str) -> dict | None:
        events = self.events.get(chat_id, [])
        return events[-1] if events and events[-1]["type"] == "chat.done" else None

    def deltas(self, chat_id: str) -> list[dict]:
        return [e for e in self.events.get(chat_id, []) if e["type"] == "chat.delta"]

    def text(self, chat_id: str) -> str:
        return "".join(e["text"] for e in self.deltas(chat_id))

    def token_ids(self, chat_id: str) -> list[int]:
        return [t for e in self.deltas(chat_id) for t in e["token_ids"]]

    def resume_token(self, chat_id: str) -> str:
        created = self.events[chat_id][0]
        assert created["type"] == "chat.created"
        return created["resume_token"]

    def last_seq(self, chat_id: str) -> int:
        seqs = [e["seq"] for e in self.events.get(chat_id, []) if "seq" in e]
        return seqs[-1] if seqs else 0

    async def until(self, ws, done, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            self.add(await recv(ws, max(0.01, deadline - time.monotonic())))

    async def until_done(self, ws, *chat_ids: str) -> None:
        await self.until(ws, lambda c: all(c.done(i) for i in chat_ids))


def check_stream(chats: Chats, chat_id: str, expected, first_seq: int = 1) -> dict:
    events = [e for e in chats.events[chat_id] if e["type"] != "chat.created"]
    assert [e["seq"] for e in events] == list(range(first_seq, first_seq + len(events)))
    done = events[-1]
    assert done["type"] == "chat.done"
    if expected is not None:
        assert chats.text(chat_id) == expected.text
        assert chats.token_ids(chat_id) == expected.token_ids
        assert done["finish_reason"] == expected.finish_reason
        usage = done["usage"]
        assert usage["prompt_tokens"] == len(expected.prompt_token_ids)
        assert usage["completion_tokens"] == len(expected.token_ids)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["cached_tokens"] >= 0
    return done


# ---- streaming ----------------------------------------------------------------------------

def test_two_concurrent_chats_on_one_connection(server, reference):
    chat_ref = greedy(reference, MESSAGES, 48)
    raw_ref = greedy(reference, PROMPT, 48)

    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("chat-a", MESSAGES, temperature=0, max_tokens=48,
                                    ignore_eos=True))
            await send(ws, **create("raw-b", PROMPT, temperature=0, max_tokens=48,
                                    ignore_eos=True, logprobs=True, top_logprobs=2))
            chats = Chats()
            await chats.until_done(ws, "chat-a", "raw-b")
            return chats

    with slow_worker(server, 0.005):   # both surely start before either ends
        chats = run(main())
    for chat_id in ("chat-a", "raw-b"):
        created = chats.events[chat_id][0]
        assert created.keys() == {"type", "id", "resume_token"}
        assert (created["type"], created["id"]) == ("chat.created", chat_id)
    assert len(chats.resume_token("chat-a")) >= 22   # 128 random bits, base64url
    assert chats.resume_token("chat-a") != chats.resume_token("raw-b")
    check_stream(chats, "chat-a", chat_ref)
    check_stream(chats, "raw-b", raw_ref)
    # Interleaved: each chat's deltas arrive while the other one is still streaming.
    ids = [e["id"] for e in chats.order if e["type"] == "chat.delta"]
    assert ids.index("raw-b") < len(ids) - 1 - ids[::-1].index("chat-a")
    assert ids.index("chat-a") < len(ids) - 1 - ids[::-1].index("raw-b")
    # Logprobs only where asked, one entry per token.
    assert all("logprobs" not in e for e in chats.deltas("chat-a"))
    for event in chats.deltas("raw-b"):
        assert len(event["logprobs"]) == len(event["token_ids"])
        for entry in event["logprobs"]:
            assert entry["logprob"] <= 0 and len(entry["top_token_ids"]) == 2
            assert entry["top_logprobs"][0] >= entry["top_logprobs"][1]
    wait_engine_idle(server)


def test_coalesced_chat_gets_every_token_in_order(server, reference):
    """?coalesce_ms=N: fewer, larger deltas (the worker is slowed so several steps fall in one
    interval), the same tokens, text and seq numbering; a bad value closes the connection."""
    ref = greedy(reference, PROMPT, 32)

    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with await connect(server.ws_url + "?coalesce_ms=50", additional_headers=headers,
                                 max_size=None, proxy=None) as ws:
            await send(ws, **create("c", PROMPT, temperature=0, max_tokens=32, ignore_eos=True))
            chats = Chats()
            await chats.until_done(ws, "c")
        async with await connect(server.ws_url + "?coalesce_ms=soon", additional_headers=headers,
                                 max_size=None, proxy=None) as ws:
            refused = await recv(ws)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        return chats, refused, closed.value

    with slow_worker(server, 0.005):
        chats, refused, closed = run(main())
    check_stream(chats, "c", ref)
    assert len(chats.deltas("c")) < len(ref.token_ids)
    assert refused["code"] == "invalid_request" and "coalesce_ms" in refused["message"]
    assert closed.rcvd.code == 1008
    wait_engine_idle(server)


def test_stop_string_and_default_max_tokens(server, reference):
    full = greedy(reference, PROMPT, 16).text
    stop = full[4:6]

    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("stop", PROMPT, temperature=0, stop=[stop]))
            chats = Chats()
            await chats.until_done(ws, "stop")
            return chats

    chats = run(main())
    done = check_stream(chats, "stop", None)
    assert done["finish_reason"] == "stop"
    assert full.startswith(chats.text("stop")) and stop not in chats.text("stop")


def test_cancel_frees_blocks(server, reference):
    expected = greedy(reference, PROMPT, 200).text

    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("long", PROMPT, temperature=0, max_tokens=200,
                                    ignore_eos=True))
            chats = Chats()
            await chats.until(ws, lambda c: c.deltas("long"))
            await send(ws, type="chat.cancel", id="long")
            await chats.until_done(ws, "long")
            # A cancel of a finished chat changes nothing; the connection keeps working.
            await send(ws, type="chat.cancel", id="long")
            await send(ws, type="ping")
            assert await recv(ws) == {"type": "pong"}
            return chats

    with slow_worker(server, 0.01):
        chats = run(main())
    done = check_stream(chats, "long", None)
    assert done["finish_reason"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 200
    assert done["usage"]["completion_tokens"] == len(chats.token_ids("long"))
    assert expected.startswith(chats.text("long"))
    wait_engine_idle(server)


def test_n_choices_stream_with_their_index(server):
    params = dict(n=3, seed=7, temperature=1.0, max_tokens=12, ignore_eos=True)
    expected = server.call(server.app.state.engine.generate_choices(PROMPT, SamplingParams(**params)))

    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("three", PROMPT, **params))
            chats = Chats()
            await chats.until_done(ws, "three")
            return chats

    chats = run(main())
    done = check_stream(chats, "three", None)
    deltas = chats.deltas("three")
    # Choice 0's frames leave "index" out, as every n == 1 chat's do.
    assert {e.get("index", 0) for e in deltas} == {0, 1, 2}
    assert all(e["index"] != 0 for e in deltas if "index" in e)
    for i, out in enumerate(expected):
        assert [t for e in deltas if e.get("index", 0) == i for t in e["token_ids"]] == out.token_ids
        assert "".join(e["text"] for e in deltas if e.get("index", 0) == i) == out.text
    assert done["finish_reason"] == "length" and done["finish_reasons"] == ["length"] * 3
    usage = done["usage"]
    assert usage["prompt_tokens"] == len(expected[0].prompt_token_ids)
    assert usage["completion_tokens"] == 36
    assert usage["total_tokens"] == usage["prompt_tokens"] + 36
    wait_engine_idle(server)


def test_n_choices_cancel_ends_every_choice(server):
    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("many", PROMPT, n=3, seed=1, max_tokens=200, ignore_eos=True))
            chats = Chats()
            await chats.until(ws, lambda c: c.deltas("many"))
            await send(ws, type="chat.cancel", id="many")
            await chats.until_done(ws, "many")
            # Cancelled before anything was computed: every choice ends too.
            await send(ws, **create("early", PROMPT, n=2, max_tokens=200, ignore_eos=True))
            await send(ws, type="chat.cancel", id="early")
            await chats.until_done(ws, "early")
            return chats

    with slow_worker(server, 0.01):
        chats = run(main())
    done = check_stream(chats, "many", None)
    assert done["finish_reason"] == "cancelled" and "cancelled" in done["finish_reasons"]
    assert 0 < done["usage"]["completion_tokens"] < 600
    assert done["usage"]["completion_tokens"] == len(chats.token_ids("many"))
    assert chats.done("early")["finish_reason"] == "cancelled"
    wait_engine_idle(server)


@contextlib.contextmanager
def stalled_sends(live: LiveServer):
    """Every frame the server sends on connections opened meanwhile waits until released: a
    client that reads nothing. Yields the release function."""
    gate = asyncio.Event()
    original = gateway_ws.Connection.start

    def start(self):
        send = self.websocket.send_text

        async def stalled(frame):
            await gate.wait()
            await send(frame)

        self.websocket.send_text = stalled
        original(self)

    gateway_ws.Connection.start = start
    try:
        yield lambda: live.loop.call_soon_threadsafe(gate.set)
    finally:
        gateway_ws.Connection.start = original
        live.loop.call_soon_threadsafe(gate.set)


def test_slow_client_costs_bounded_memory(server, reference):
    expected = greedy(reference, PROMPT, 100)
    names = ["slow-0", "slow-1", "slow-2"]

    async def queued() -> int | None:
        """Frames queued on the connection, once every chat is in the engine."""
        by_id = {chat.id: chat for chat in server.app.state.chats.by_token.values()}
        chats = [by_id.get(name) for name in names]
        if not all(chat is not None and chat.submitted for chat in chats):
            return None
        assert len({chat.conn for chat in chats}) == 1
        return len(chats[0].conn.queue)

    def backlog_when_generated() -> int:
        while server.call(queued()) is None:
            time.sleep(0.01)
        wait_engine_idle(server)
        return server.call(queued())

    async def main():
        with stalled_sends(server) as release:
            async with await open_ws(server) as client:
                for name in names:
                    await send(client, **create(name, PROMPT, temperature=0, max_tokens=100,
                                                ignore_eos=True))
                # The engine runs every chat to its end while the client reads nothing, and
                # the server holds a few frames per chat, the rest merged.
                backlog = await asyncio.to_thread(backlog_when_generated)
                release()
                chats = Chats()
                await chats.until_done(client, *names)
        return backlog, chats

    backlog, chats = run(main())
    assert backlog <= len(names) * (gateway_ws._CHAT_INFLIGHT + 1)   # + chat.created
    for name in names:
        check_stream(chats, name, expected)
        assert len(chats.deltas(name)) <= gateway_ws._CHAT_INFLIGHT + 1


# ---- resume -------------------------------------------------------------------------------

def test_resume_after_dropped_connection(server, reference):
    expected = greedy(reference, MESSAGES, 120)

    async def main():
        ws = await open_ws(server)
        await send(ws, **create("resumable", MESSAGES, temperature=0, max_tokens=120,
                                ignore_eos=True))
        before = Chats()
        await before.until(ws, lambda c: c.last_seq("resumable") >= 3)
        ws.transport.abort()           # the network drops: no close handshake
        await asyncio.sleep(0.2)       # the chat runs on detached meanwhile
        async with await open_ws(server) as ws2:
            await send(ws2, type="chat.resume", id="resumable",
                       after_seq=before.last_seq("resumable"),
                       token=before.resume_token("resumable"))
            after = Chats()
            await after.until_done(ws2, "resumable")
        return before, after

    with slow_worker(server, 0.005):
        before, after = run(main())
    last = before.last_seq("resumable")
    check_stream(after, "resumable", None, first_seq=last + 1)
    assert before.text("resumable") + after.text("resumable") == expected.text
    assert before.token_ids("resumable") + after.token_ids("resumable") == expected.token_ids
    assert after.done("resumable")["usage"]["completion_tokens"] == 120
    wait_engine_idle(server)


def test_resume_moves_chat_from_a_live_connection(server, reference):
    expected = greedy(reference, PROMPT, 100)

    async def main():
        async with await open_ws(server) as ws1, await open_ws(server) as ws2:
            await send(ws1, **create("moved", PROMPT, temperature=0, max_tokens=100,
                                     ignore_eos=True))
            first = Chats()
            await first.until(ws1, lambda c: c.last_seq("moved") >= 2)
            await send(ws2, type="chat.resume", id="moved", after_seq=2,
                       token=first.resume_token("moved"))
            second = Chats()
            await second.until_done(ws2, "moved")
            # Whatever ws1 still had in flight, the move stops it: no chat.done there.
            await send(ws1, type="ping")
            await first.until(ws1, lambda c: c.other)
            return first, second

    with slow_worker(server, 0.01):
        first, second = run(main())
    assert first.other == [{"type": "pong"}] and first.done("moved") is None
    check_stream(second, "moved", None, first_seq=3)
    head = [e for e in first.deltas("moved") if e["seq"] <= 2]
    assert "".join(e["text"] for e in head) + second.text("moved") == expected.text
    wait_engine_idle(server)


def test_resume_a_finished_chat_replays_its_end(server, reference):
    expected = greedy(reference, PROMPT, 10)

    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("finished", PROMPT, temperature=0, max_tokens=10,
                                    ignore_eos=True))
            chats = Chats()
            await chats.until_done(ws, "finished")
        async with await open_ws(server) as ws:
            await send(ws, type="chat.resume", id="finished", after_seq=0,
                       token=chats.resume_token("finished"))
            replay = Chats()
            await replay.until_done(ws, "finished")
        return chats, replay

    chats, replay = run(main())
    check_stream(chats, "finished", expected)
    check_stream(replay, "finished", expected)


def test_resume_past_the_kept_history_is_refused(server):
    async def main():
        async with await open_ws(server) as ws:
            # 20 top logprobs a token: far over the 8 KiB of history a chat keeps.
            await send(ws, **create("big", PROMPT, max_tokens=60, ignore_eos=True,
                                    top_logprobs=20))
            chats = Chats()
            await chats.until_done(ws, "big")
            last = chats.last_seq("big")
            await send(ws, type="chat.resume", id="big", after_seq=0)
            gap = await recv(ws)
            await send(ws, type="chat.resume", id="big", after_seq=last - 2)
            tail = Chats()
            await tail.until_done(ws, "big")
        return chats, gap, tail

    chats, gap, tail = run(main())
    assert (gap["type"], gap["id"], gap["code"]) == ("error", "big", "resume_gap")
    assert tail.events["big"] == chats.events["big"][-2:]


def test_detached_chats_expire_and_free_blocks(short_server):
    async def start_and_drop():
        ws = await open_ws(short_server, key=None)
        await send(ws, **create("gone-1", PROMPT, max_tokens=220, ignore_eos=True))
        await send(ws, **create("gone-2", MESSAGES, max_tokens=220, ignore_eos=True))
        chats = Chats()
        await chats.until(ws, lambda c: c.deltas("gone-1") and c.deltas("gone-2"))
        ws.transport.abort()
        return time.monotonic(), chats

    async def resume_both(chats):
        async with await open_ws(short_server, key=None) as ws:
            for chat_id in ("gone-1", "gone-2"):
                await send(ws, type="chat.resume", id=chat_id, after_seq=1,
                           token=chats.resume_token(chat_id))
                event = await recv(ws)
                assert event["type"] == "error" and event["id"] == chat_id
                assert event["code"] == "unknown_chat"

    with slow_worker(short_server, 0.01):   # 220 steps would take over two seconds
        dropped, chats = run(start_and_drop())
        stats = wait_engine_idle(short_server)
        assert time.monotonic() - dropped < 1.8
    assert stats.kv_blocks_used == 0
    assert len(short_server.app.state.chats) == 0
    run(resume_both(chats))


def test_detached_chat_over_the_resume_buffer_is_cancelled(server):
    async def main():
        ws = await open_ws(server)
        # 20 top logprobs a token: the output outgrows the 8 KiB resume buffer quickly.
        await send(ws, **create("flood", PROMPT, max_tokens=230, ignore_eos=True,
                                top_logprobs=20))
        chats = Chats()
        await chats.until(ws, lambda c: c.deltas("flood"))
        ws.transport.abort()
        await asyncio.sleep(0.1)
        await asyncio.to_thread(wait_engine_idle, server)   # cancelled well before 230 tokens
        async with await open_ws(server) as ws2:
            token = chats.resume_token("flood")
            await send(ws2, type="chat.resume", id="flood", after_seq=chats.last_seq("flood"),
                       token=token)
            error = await recv(ws2)
            await send(ws2, type="chat.resume", id="flood", after_seq=0, token=token)
            again = await recv(ws2)
        return error, again

    error, again = run(main())
    assert error["type"] == "error" and error["id"] == "flood"
    assert error["code"] == "resume_overflow"
    assert again["code"] == "unknown_chat"     # the error is reported once, then forgotten


# ---- authentication -----------------------------------------------------------------------

async def _expect_refused(ws) -> dict:
    event = await recv(ws)
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    return event


def test_auth_header_and_first_message(server):
    async def main():
        async with await open_ws(server) as ws:
            await send(ws, type="ping")
            assert await recv(ws) == {"type": "pong"}
        async with await open_ws(server, key=None) as ws:
            await send(ws, type="auth", token=KEY)
            await send(ws, **create("authed", PROMPT, max_tokens=4))
            chats = Chats()
            await chats.until_done(ws, "authed")
            assert chats.done("authed")["usage"]["completion_tokens"] == 4

    run(main())


@pytest.mark.parametrize("key, first", [
    ("wrong", None),                                 # wrong key in the header
    (None, {"type": "auth", "token": "wrong"}),      # wrong token
    (None, {"type": "ping"}),                        # anything but auth first
    (None, {"type": "chat.create", "id": "x", "prompt": "hi"}),
    (None, "{not json"),
    (None, None),                                    # nothing within ws_auth_timeout_s
])
def test_auth_refused(server, key, first):
    async def main():
        ws = await open_ws(server, key=key)
        if first is not None:
            await ws.send(first if isinstance(first, str) else json.dumps(first))
        return await _expect_refused(ws)

    event = run(main())
    assert event["type"] == "error" and event["code"] == "unauthorized" and event["id"] is None


# ---- errors -------------------------------------------------------------------------------

IMAGE = [{"role": "user", "content": [
    {"type": "text", "text": "What is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]

BAD = [
    (create("busy", PROMPT), "busy", "duplicate_id"),      # first: "busy" is surely running
    ("{not json", None, "malformed_json"),
    ({"type": "chat.frobnicate", "id": "e1"}, "e1", "unknown_type"),
    ({"id": "e2"}, "e2", "unknown_type"),
    ({"type": "chat.create"}, None, "invalid_message"),
    ({"type": "chat.create", "id": "e3"}, "e3", "invalid_message"),
    ({"type": "chat.create", "id": "e4", "prompt": "hi", "messages": MESSAGES}, "e4",
     "invalid_message"),
    ({"type": "chat.create", "id": "e5", "prompt": 5}, "e5", "invalid_message"),
    ({"type": "chat.create", "id": "e6", "messages": "hi"}, "e6", "invalid_message"),
    ({"type": "chat.resume", "id": "e7", "after_seq": "x"}, "e7", "invalid_message"),
    ({"type": "chat.create", "id": 8, "prompt": "hi"}, None, "invalid_message"),
    ([1, 2, 3], None, "invalid_message"),
    (create("e9", PROMPT, temperature=-1), "e9", "invalid_params"),
    (create("e10", PROMPT, max_tokens="ten"), "e10", "invalid_params"),
    (create("e11", PROMPT, max_token=5), "e11", "invalid_params"),
    (create("e12", "hello " * 300), "e12", "invalid_request"),          # prompt too long
    (create("e13", PROMPT, max_tokens=1000), "e13", "invalid_request"),  # beyond the context
    (create("e14", IMAGE), "e14", "invalid_request"),                   # images, text model
    (create("e15", []), "e15", "invalid_request"),                      # empty conversation
    ({"type": "chat.cancel", "id": "nope"}, "nope", "unknown_chat"),
    ({"type": "chat.resume", "id": "nope", "after_seq": 0}, "nope", "unknown_chat"),
    (create("e16", "x" * (MAX_MESSAGE + 10)), None, "message_too_large"),
]


def test_bad_messages_get_errors_and_disturb_nothing(server, reference):
    expected = greedy(reference, PROMPT, 80)

    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("busy", PROMPT, temperature=0, max_tokens=80,
                                    ignore_eos=True))
            chats = Chats()
            await chats.until(ws, lambda c: c.events.get("busy"))
            for message, chat_id, code in BAD:
                chats.other.clear()
                await ws.send(message if isinstance(message, str) else json.dumps(message))
                await send(ws, type="ping")
                # The error and the pong, in either order (errors found after tokenizing the
                # prompt come from the chat's task).
                await chats.until(ws, lambda c: len(c.other) == 2)
                errors = [e for e in chats.other if e["type"] == "error"]
                assert {"type": "pong"} in chats.other and len(errors) == 1, (message, chats.other)
                error = errors[0]
                assert (error["id"], error["code"]) == (chat_id, code), (message, error)
                assert error["message"]
            # Another chat completes; the busy one was never disturbed.
            await send(ws, **create("after", PROMPT, temperature=0, max_tokens=8,
                                    ignore_eos=True))
            await chats.until_done(ws, "busy", "after")
            # A finished chat's id may be used again.
            await send(ws, **create("busy", PROMPT, temperature=0, max_tokens=3))
            again = Chats()
            await again.until_done(ws, "busy")
            return chats

    with slow_worker(server, 0.002):
        chats = run(main())
    errored = {chat_id for _, chat_id, _ in BAD}
    assert set(chats.events) == {"busy", "after"} and not errored & {"after"}
    check_stream(chats, "busy", expected)
    check_stream(chats, "after", greedy(reference, PROMPT, 8))
    wait_engine_idle(server)
