"""The gateway's defences on a real server: bad input is a 4xx (never a 500), overload is a 429,
chats belong to their connection, connections are bounded and timed out, auth is parsed one way,
a disconnect aborts silently, and draining refuses new work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from streamvlm.errors import EngineOverloadedError
from streamvlm.gateway.auth import check_authorization
from streamvlm.gateway.json_depth import json_too_deep
from tests.live_server import LiveServer
from tests import test_ws
from tests.test_ws import Chats, create, recv, run, send, slow_worker, start_server, wait_engine_idle

KEY = "sk-limits"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The quick brown fox"
DEEP = 50_000


@pytest.fixture(scope="module")
def server(llama_path):
    live = start_server(llama_path, api_key=KEY, max_chats_per_connection=2,
                   max_kept_chats_per_connection=3)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def guarded(llama_path):
    """Small connection limits: 3 connections, request heads within half a second, WebSocket
    connections idle for a second closed."""
    live = start_server(llama_path, max_connections=3, header_timeout_s=0.5, ws_idle_timeout_s=1.0)
    yield live
    live.stop()


def post(live: LiveServer, path: str, body: Any, key: str | None = KEY,
         **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Content-Type"] = "application/json"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.base_url + path, content=content, headers=headers,
                      **{"timeout": 30, **kwargs})


async def open_ws(live: LiveServer, key: str | None = KEY):
    return await test_ws.open_ws(live, key)


async def ws_error(ws, message: str | dict) -> dict:
    """Send one message and return the error event it gets (after the chat.created of a chat
    refused at submission, once its prompt was tokenized)."""
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    event = await recv(ws)
    if event["type"] == "chat.created":
        event = await recv(ws)
    assert event["type"] == "error", event
    return event


# ---- 400s, not 500s -----------------------------------------------------------------------

def test_json_depth_scan():
    assert not json_too_deep(b"[[[]]]", 3) and json_too_deep(b"[[[[]]]]", 3)
    assert json_too_deep(b"[" * DEEP, 64) and json_too_deep(b'{"a":' * DEEP, 64)
    # Brackets inside strings, escaped quotes included, nest nothing.
    text = json.dumps({"a": "[[[[{{{{\\\"[[[[", "b": [[1], [2], [3], [4], [5]]})
    assert not json_too_deep(text, 3) and json_too_deep(text.replace('"b": [', '"b": [[[['), 3)
    assert not json_too_deep("[" + "[1]," * 10_000 + "[1]]", 2)


@pytest.mark.parametrize("body", [b"[" * DEEP + b"]" * DEEP, b'{"messages": ' + b"[" * DEEP,
                                  b'{"a":' * DEEP + b"1" + b"}" * DEEP])
def test_deep_json_is_a_400(server, body):
    for path in ("/v1/chat/completions", "/v1/completions"):
        resp = post(server, path, body)
        assert resp.status_code == 400, resp.text
        assert "nested deeper" in resp.json()["error"]["message"]


@pytest.mark.parametrize("role", [5, None, {}, "wizard"])
def test_bad_role_is_a_400(server, role):
    body = {"messages": [{"role": role, "content": "hi"}], "max_tokens": 2}
    resp = post(server, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "role" in error["message"] and error["param"] == "messages"
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", body).status_code == 200


def test_bad_role_and_deep_json_over_websocket(server):
    async def main():
        async with await open_ws(server) as ws:
            errors = [await ws_error(ws, create(f"r{i}", [{"role": role, "content": "hi"}]))
                      for i, role in enumerate([5, None, {}, "wizard"])]
            deep = await ws_error(ws, '{"type": "chat.create", "id": "d", "messages": '
                                      + "[" * DEEP + "]" * DEEP + "}")
            unclosed = await ws_error(ws, "[" * DEEP)
            await send(ws, **create("fine", PROMPT, max_tokens=2))
            chats = Chats()
            await chats.until_done(ws, "fine")
        return errors, deep, unclosed

    errors, deep, unclosed = run(main())
    assert [(e["id"], e["code"]) for e in errors] == [(f"r{i}", "invalid_request")
                                                      for i in range(4)]
    assert all("role" in e["message"] for e in errors)
    assert (deep["code"], unclosed["code"]) == ("invalid_request", "invalid_request")
    assert "nested deeper" in deep["message"]


@contextlib.contextmanager
def engine_refuses(live: LiveServer, exc: Exception):
    """Every submission to the engine raises ``exc``, as EngineCore admission would."""
    engine = live.app.state.engine

    async def refuse(*args: Any, **kwargs: Any):
        raise exc

    engine._submit = refuse
    try:
        yield
    finally:
        del engine._submit


def test_value_error_at_submission_is_a_400(server):
    with engine_refuses(server, ValueError("the engine refused this prompt")):
        for stream in (False, True):
            resp = post(server, "/v1/chat/completions",
                        {"messages": MESSAGES, "max_tokens": 2, "stream": stream})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["message"] == "the engine refused this prompt"

        async def main():
            async with await open_ws(server) as ws:
                return await ws_error(ws, create("refused", MESSAGES, max_tokens=2))

        error = run(main())
    assert (error["id"], error["code"]) == ("refused", "invalid_request")


# ---- admission control --------------------------------------------------------------------

def test_overload_is_a_429_with_retry_after(server):
    with engine_refuses(server, EngineOverloadedError("too many requests", retry_after=2.5)):
        for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}),
                           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})):
            for stream in (False, True):
                resp = post(server, path, {**body, "stream": stream})
                assert resp.status_code == 429, resp.text
                assert resp.headers["retry-after"] == "3"
                error = resp.json()["error"]
                assert (error["type"], error["code"]) == ("overloaded", 429)

        async def main():
            async with await open_ws(server) as ws:
                return await ws_error(ws, create("busy", MESSAGES, max_tokens=2))

        error = run(main())
    assert (error["id"], error["code"], error["retry_after"]) == ("busy", "overloaded", 2.5)
    # Admitted again once the engine is.
    assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


# ---- client disconnects -------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_disconnect_from_a_full_response_aborts_silently(server):
    finished = server.app.state.engine.metrics.requests_finished
    aborted_before = finished.get("abort", 0)
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with slow_worker(server, 0.01), pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/chat/completions",
                 {"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True},
                 timeout=httpx.Timeout(30, read=0.3))
        wait_engine_idle(server)
        assert finished.get("abort", 0) == aborted_before + 1
        # A request afterwards, so that anything the abort logged is surely in.
        assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}
                    ).status_code == 200
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    noisy = [r for r in records.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


# ---- resume -------------------------------------------------------------------------------

def test_resume_past_the_end_of_a_finished_chat_gets_its_done(server):
    async def main():
        async with await open_ws(server) as ws:
            await send(ws, **create("short", PROMPT, max_tokens=3, ignore_eos=True))
            chats = Chats()
            await chats.until_done(ws, "short")
            last = chats.last_seq("short")
            token = chats.resume_token("short")
            replies = []
            for after_seq in (last, last + 5):
                await send(ws, type="chat.resume", id="short", after_seq=after_seq)
                replies.append(await recv(ws))
        async with await open_ws(server) as ws:
            await send(ws, type="chat.resume", id="short", after_seq=last + 5, token=token)
            replies.append(await recv(ws))
        return chats.done("short"), replies

    done, replies = run(main())
    assert replies == [done, done, done]


# ---- chats belong to their connection -----------------------------------------------------

def test_chats_belong_to_their_connection(server):
    async def main():
        async with await open_ws(server) as a, await open_ws(server) as b:
            await send(a, **create("same", PROMPT, max_tokens=200, ignore_eos=True))
            a_chats = Chats()
            await a_chats.until(a, lambda c: c.deltas("same"))
            # B knows the id, not the token: it can neither take the chat nor cancel it.
            no_token = await ws_error(b, {"type": "chat.resume", "id": "same", "after_seq": 0})
            wrong = await ws_error(b, {"type": "chat.resume", "id": "same", "after_seq": 0,
                                       "token": "guessed"})
            cancel = await ws_error(b, {"type": "chat.cancel", "id": "same"})
            # B may use the same id for a chat of its own.
            await send(b, **create("same", PROMPT, max_tokens=3))
            b_chats = Chats()
            await b_chats.until_done(b, "same")
            # With the token, B takes A's chat over (A gets nothing more of it) and cancels it.
            await send(b, type="chat.resume", id="same", after_seq=a_chats.last_seq("same"),
                       token=a_chats.resume_token("same"))
            taken = Chats()
            await taken.until(b, lambda c: c.deltas("same"))
            await send(b, type="chat.cancel", id="same")
            await taken.until_done(b, "same")
        return no_token, wrong, cancel, b_chats, taken

    with slow_worker(server, 0.02):   # A's 200 tokens surely outlast the exchange
        no_token, wrong, cancel, b_chats, taken = run(main())
    assert [(e["id"], e["code"]) for e in (no_token, wrong, cancel)] == \
        [("same", "unknown_chat")] * 3
    assert b_chats.done("same")["usage"]["completion_tokens"] == 3
    assert taken.done("same")["finish_reason"] == "cancelled"
    wait_engine_idle(server)


def test_chats_per_connection_are_bounded(server):
    """At most 2 running chats and 3 kept (the fixture's limits)."""
    async def main():
        async with await open_ws(server) as ws:
            chats = Chats()
            for name in ("run-1", "run-2"):
                await send(ws, **create(name, PROMPT, max_tokens=200, ignore_eos=True))
            await chats.until(ws, lambda c: c.deltas("run-1") and c.deltas("run-2"))
            await send(ws, **create("run-3", PROMPT, max_tokens=2))
            await chats.until(ws, lambda c: c.other)
            too_many = chats.other.pop()
            for name in ("run-1", "run-2"):
                await send(ws, type="chat.cancel", id=name)
            await chats.until_done(ws, "run-1", "run-2")
            for name in ("f-1", "f-2", "f-3"):   # 5 finished chats: the 2 oldest forgotten
                await send(ws, **create(name, PROMPT, max_tokens=1))
                await chats.until_done(ws, name)
            replies = {}
            for name in ("run-1", "run-2", "f-1", "f-2", "f-3"):
                await send(ws, type="chat.resume", id=name, after_seq=chats.last_seq(name))
                replies[name] = await recv(ws)
        return too_many, replies

    with slow_worker(server, 0.01):
        too_many, replies = run(main())
    assert (too_many["id"], too_many["code"]) == ("run-3", "too_many_chats")
    assert [replies[n]["code"] for n in ("run-1", "run-2")] == ["unknown_chat"] * 2
    assert [replies[n]["type"] for n in ("f-1", "f-2", "f-3")] == ["chat.done"] * 3
    wait_engine_idle(server)



def test_detached_chats_are_bounded_server_wide(llama_path):
    """With max_detached_chats=1, a second dropped connection's chat pushes out the first's:
    it is cancelled (its blocks freed) and cannot be resumed; the newer one still can."""
    live = start_server(llama_path, max_detached_chats=1)

    async def drop_a_running_chat(name: str) -> str:
        ws = await open_ws(live, None)
        chats = Chats()
        await send(ws, **create(name, PROMPT, max_tokens=200, ignore_eos=True))
        await chats.until(ws, lambda c: c.deltas(name))
        ws.transport.abort()
        return chats.resume_token(name)

    async def main():
        first = await drop_a_running_chat("a")
        await asyncio.sleep(0.1)
        second = await drop_a_running_chat("b")
        await asyncio.sleep(0.1)
        async with await open_ws(live, None) as ws:
            await send(ws, type="chat.resume", id="a", after_seq=0, token=first)
            refused = await recv(ws)
            await send(ws, type="chat.resume", id="b", after_seq=0, token=second)
            resumed = await recv(ws)
            await send(ws, type="chat.cancel", id="b")
        return refused, resumed

    try:
        with slow_worker(live, 0.01):
            refused, resumed = run(main())
        assert refused["type"] == "error" and refused["code"] == "unknown_chat"
        assert resumed["type"] == "chat.delta" and resumed["id"] == "b"
        wait_engine_idle(live)
    finally:
        live.stop()


# ---- authentication -----------------------------------------------------------------------

def test_authorization_parsing():
    def check(*values: bytes) -> bool | None:
        return check_authorization([(b"authorization", v) for v in values], KEY)

    key = KEY.encode()
    assert check() is None
    assert check(b"Bearer " + key) and check(b"bearer " + key) and check(b"BEARER " + key)
    assert check(b"  Bearer   " + key + b" ")
    assert not check(b"Basic " + key) and not check(b"Bearer") and not check(b"Bearer x")
    assert not check(b"Bearer " + key, b"Bearer " + key)     # duplicated: refused
    assert not check(b"Bearer " + key + b"x") and not check(key)


def test_auth_is_parsed_alike_over_http_and_websocket(server):
    def models(*values: str) -> int:
        headers = [("Authorization", v) for v in values]
        return httpx.get(server.base_url + "/v1/models", headers=headers).status_code

    assert [models(f"{scheme} {KEY}") for scheme in ("Bearer", "bearer", "BEARER")] == [200] * 3
    assert models(f"Bearer {KEY}", f"Bearer {KEY}") == 401
    assert models(f"Basic {KEY}") == 401

    async def ws_status(*values: str) -> str:
        from websockets.asyncio.client import connect

        headers = [("Authorization", v) for v in values]
        ws = await connect(server.ws_url, additional_headers=headers, proxy=None)
        try:
            with contextlib.suppress(ConnectionClosed):   # refused: the error came first
                await send(ws, type="ping")
            event = await recv(ws)
        finally:
            with contextlib.suppress(ConnectionClosed):
                await ws.close()
        return "ok" if event == {"type": "pong"} else event["code"]

    assert run(ws_status(f"bearer {KEY}")) == "ok"
    assert run(ws_status(f"BEARER {KEY}")) == "ok"
    assert run(ws_status(f"Bearer {KEY}", f"Bearer {KEY}")) == "unauthorized"


# ---- connections --------------------------------------------------------------------------

def _connect(live: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    return sock


def _closed_by_server(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_silent_and_slowloris_connections_are_closed(guarded):
    silent = _connect(guarded)
    slow = _connect(guarded)
    # Trickle a request head byte by byte, never finishing it, until the server hangs up.
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 10_000
    started = time.monotonic()
    closed = False
    with slow:
        for byte in head:
            try:
                slow.send(bytes([byte]))
            except OSError:
                closed = True
                break
            slow.settimeout(0.05)
            try:
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > 30:
                break
    assert closed, "a head trickled byte by byte kept its connection for 30 s"
    with silent:
        assert _closed_by_server(silent) == b""
    # A prompt client is unaffected.
    assert httpx.get(guarded.base_url + "/health").status_code == 200


def test_a_complete_head_is_not_timed_out_while_its_body_comes(guarded):
    """The head timeout ends with the head: a body that takes longer than header_timeout_s
    still gets its answer (and a WebSocket outlives it: test_idle_websocket_is_closed)."""
    body = b'{"prompt": "hello"}'
    with _connect(guarded) as sock:
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.8)   # header_timeout_s is 0.5
        sock.sendall(body)
        sock.settimeout(10)
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 200"), response[:200]


def test_the_http_protocol_is_httptools_where_installed():
    from streamvlm.gateway.server import GuardedH11Protocol, http_protocol

    try:
        import httptools  # noqa: F401
    except ImportError:
        assert http_protocol() is GuardedH11Protocol
    else:
        assert http_protocol().__name__ == "GuardedHttpToolsProtocol"


def test_connections_beyond_the_limit_are_refused(guarded):
    deadline = time.monotonic() + 15
    while guarded.server.server_state.connections:   # earlier tests' connections are gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held = [_connect(guarded) for _ in range(3)]
    try:
        for sock in held:   # each one surely accepted before the next is counted
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with _connect(guarded) as extra:
            reply = _closed_by_server(extra)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 15
    while True:   # the held connections' slots free up as the server sees them close
        if httpx.get(guarded.base_url + "/health").status_code == 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_idle_websocket_is_closed(guarded):
    async def main():
        async with await open_ws(guarded, key=None) as ws:
            await send(ws, **create("brief", PROMPT, max_tokens=2))
            chats = Chats()
            await chats.until_done(ws, "brief")
            event = await recv(ws, timeout=20)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        return event, closed.value.rcvd

    event, close = run(main())
    assert (event["type"], event["code"]) == ("error", "idle_timeout")
    assert close is not None and close.code == 1001


# ---- draining -----------------------------------------------------------------------------

def test_draining_refuses_new_work(server):
    gate = server.app.state.shutdown_gate

    async def main():
        async with await open_ws(server) as open_before:
            gate.draining = True
            try:
                refused_chat = await ws_error(open_before, create("late", PROMPT, max_tokens=2))
                async with await open_ws(server) as opened_after:
                    refused_connection = await recv(opened_after)
                    with pytest.raises(ConnectionClosed):
                        await asyncio.wait_for(opened_after.recv(), 10)
                http = await asyncio.to_thread(post, server, "/v1/completions",
                                               {"prompt": PROMPT, "max_tokens": 2})
            finally:
                gate.draining = False
        return refused_chat, refused_connection, http

    refused_chat, refused_connection, http = run(main())
    assert (refused_chat["id"], refused_chat["code"]) == ("late", "shutting_down")
    assert refused_connection["code"] == "shutting_down"
    assert http.status_code == 503 and http.json()["error"]["type"] == "shutting_down"
