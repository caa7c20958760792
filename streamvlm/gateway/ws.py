"""The WebSocket chat stream at ``/v1/ws``: many chats over one connection, resumable after a
reconnect. JSON text frames (binary frames holding JSON are read the same), one event per
frame.

Client to server::

    {"type": "chat.create", "id": "c1", "messages": [...] | "prompt": "..." | [ids], "params": {...},
     "chat_template_kwargs": {...},                         # optional, with messages only
     "tools": [...], "tool_choice": ..., "parallel_tool_calls": true}   # likewise, as over HTTP
    {"type": "chat.cancel", "id": "c1"}
    {"type": "chat.resume", "id": "c1", "after_seq": 7, "token": "..."}  # chat.created's token
    {"type": "ping"}
    {"type": "auth", "token": "..."}     # first message, when the server has an API key

Server to client::

    {"type": "chat.created", "id": "c1", "resume_token": "..."}
    {"type": "chat.delta", "id": "c1", "seq": 1, "text": "...", "token_ids": [...],
     "logprobs": [{"logprob": ..., "top_token_ids": [...], "top_logprobs": [...]}],  # if asked
     "tool_calls": [{"index": 0, "id": "call_...", "type": "function",              # with tools
                     "function": {"name": "...", "arguments": "..."}}],
     "index": 1}                                        # params.n > 1: the choice (absent: 0)
    {"type": "chat.done", "id": "c1", "seq": 9,
     "finish_reason": "stop" | "length" | "cancelled" | "tool_calls",
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"},
     "finish_reasons": [...]}                           # params.n > 1: each choice's
    {"type": "error", "id": "c1" | null, "code": "...", "message": "...",
     "retry_after": 1.5}                                         # with code "overloaded" only
    {"type": "pong"}

``/v1/ws?coalesce_ms=N`` asks for the connection's chats to stream a delta at most every N
milliseconds (after the first), each carrying all the output since the previous one; without
it the server's ``stream_coalesce_ms`` applies (default 0: a delta as soon as there is output).

A chat ends with chat.done, or with an error event carrying its id. Each chat's delta and done
events are numbered 1, 2, 3... (``seq``). A bad message gets an error event and never closes the
connection or disturbs the other chats; only authentication failures close it (code 1008),
idleness (no chat running and no message for ``ws_idle_timeout_s``, code 1001) and shutdown.

Chats belong to their connection: ids are the connection's own (other connections may use the
same ids), and only it can cancel or resume them by id. Another connection takes a chat over
with ``chat.resume`` carrying the chat's ``resume_token`` (128 random bits, sent in
chat.created): the token is the chat's key in the server-wide registry.

Design. One task per chat runs ``engine.stream``; one writer task per connection sends frames
from a queue. A chat appends each frame to its history and to its connection's queue in one
synchronous step, so a ``chat.resume`` (which replays the history and moves the chat to the
new connection, also synchronously) can neither lose nor repeat a frame. A chat keeps at most
``_CHAT_INFLIGHT`` frames queued on its connection and then waits: meanwhile the engine merges
its output into one pending delta, so a slow client costs bounded memory, not a growing queue.

A chat's history keeps its latest frames up to ``resume_buffer_bytes``. When its connection
drops, the chat keeps running detached for ``resume_window_s``; then it is cancelled (the engine
request aborted, its KV blocks freed) and forgotten. A detached chat whose history outgrows
``resume_buffer_bytes`` is cancelled at once, and a later resume gets the error. A finished chat
is kept ``resume_window_s`` after it finished, so that a client who lost the connection before
the chat.done arrived can still resume it. A connection runs at most
``max_chats_per_connection`` chats at once and keeps at most ``max_kept_chats_per_connection``
(running or finished) for resume, forgetting its oldest finished chats first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections import deque
from typing import Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.request_state import OutputDelta, Usage
from streamvlm.errors import EngineDeadError, EngineOverloadedError
from streamvlm.gateway.auth import check_authorization, key_matches
from streamvlm.gateway.common import (RequestError, check_messages, choice_request_ids, choice_stream, prepare,
                                      sampling_params)
from streamvlm.gateway.json_depth import json_too_deep
from streamvlm.gateway.openai_schemas import ToolChoice, ToolDefinition
from streamvlm.gateway.settings import MAX_COALESCE_MS, GatewaySettings
from streamvlm.gateway.shutdown import ShutdownGate
from streamvlm.gateway.tool_parsers import ToolCallParser
from streamvlm.gateway.tools import ToolPlan, openai_tool_call_deltas, plan_request_tools
from streamvlm.contract.sampling import SamplingParams, StructuredOutputs
from streamvlm.inputs.chat import TemplateValue

log = logging.getLogger(__name__)

_CHAT_INFLIGHT = 4        # frames of one chat queued on its connection before the chat waits
_CONTROL_BACKLOG = 256    # queued frames past which the reader stops reading (pings, errors)

# ---- client -> server -----------------------------------------------------------------------


class ChatCreate(msgspec.Struct, tag="chat.create", tag_field="type", kw_only=True):
    id: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    params: dict[str, Any] = {}
    chat_template_kwargs: dict[str, TemplateValue] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True


class ChatCancel(msgspec.Struct, tag="chat.cancel", tag_field="type", kw_only=True):
    id: str


class ChatResume(msgspec.Struct, tag="chat.resume", tag_field="type", kw_only=True):
    id: str
    after_seq: int = 0
    token: str | None = None     # needed to resume a chat another connection created


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


class Auth(msgspec.Struct, tag="auth", tag_field="type", kw_only=True):
    token: str


ClientMessage = ChatCreate | ChatCancel | ChatResume | Ping | Auth
_CLIENT_TYPES = {"chat.create", "chat.cancel", "chat.resume", "ping", "auth"}


class _Envelope(msgspec.Struct):
    """What can be salvaged from an invalid message, to address the error event."""

    type: Any = None
    id: Any = None


# ---- server -> client -----------------------------------------------------------------------


class ChatCreated(msgspec.Struct, tag="chat.created", tag_field="type"):
    id: str
    resume_token: str


class LogprobEntry(msgspec.Struct):
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class ChatDelta(msgspec.Struct, tag="chat.delta", tag_field="type", omit_defaults=True):
    id: str
    seq: int
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    index: int = 0      # the choice, with params.n > 1


class ChatUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class ChatDone(msgspec.Struct, tag="chat.done", tag_field="type", omit_defaults=True):
    id: str
    seq: int
    # With params.n > 1: "cancelled", else "length" if any choice ran out of tokens, else
    # "tool_calls" if any choice made a tool call, else "stop"; finish_reasons holds each
    # choice's, by index.
    finish_reason: str
    usage: ChatUsage
    finish_reasons: list[str] | None = None


class ErrorEvent(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    id: str | None
    code: str
    message: str
    retry_after: float | None = None


class Pong(msgspec.Struct, tag="pong", tag_field="type"):
    pass


_decoder = msgspec.json.Decoder(ClientMessage)
_encode = msgspec.json.Encoder().encode
_PONG = _encode(Pong()).decode()
_PARAM_FIELDS = frozenset(SamplingParams.__struct_fields__)
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def _error_frame(chat_id: str | None, code: str, message: str) -> str:
    return _encode(ErrorEvent(chat_id, code, message)).decode()


def _frame(event: msgspec.Struct) -> str:
    return _encode(event).decode()


class _Overflow(Exception):
    """A detached chat's history outgrew resume_buffer_bytes."""


# ---- registry, chats, connections -----------------------------------------------------------


class ChatRegistry:
    """Every chat of the server by resume token, attached to a connection or detached
    (awaiting resume)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.by_token: dict[str, Chat] = {}
        # Chats without a connection (awaiting chat.resume), oldest first: server-wide at most
        # max_detached_chats, so reconnecting clients cannot pile up kept output without bound.
        self.detached: dict[str, Chat] = {}

    def __len__(self) -> int:
        return len(self.by_token)

    def running(self) -> int:
        return sum(not chat.finished for chat in self.by_token.values())

    def keep_detached(self, chat: Chat) -> None:
        self.detached[chat.resume_token] = chat
        while len(self.detached) > self.settings.max_detached_chats:
            next(iter(self.detached.values())).end_retention()

    async def close(self) -> None:
        """Cancel every chat (aborting its engine request) and forget it."""
        chats = list(self.by_token.values())
        self.by_token.clear()
        tasks = []
        for chat in chats:
            chat.forget()
            if chat.task is not None and not chat.task.done():
                chat.task.cancel()
                tasks.append(chat.task)
        await asyncio.gather(*tasks, return_exceptions=True)


class Chat:
    __slots__ = ("registry", "engine", "id", "resume_token", "request_id", "prompt", "params",
                 "template_kwargs", "tool_request", "tool_plan", "tool_parsers", "tool_called",
                 "max_tokens_given", "conn", "gen", "inflight", "space", "history",
                 "history_bytes", "seq",
                 "detach_seq", "submitted", "cancel_requested", "finished", "error", "timer",
                 "task", "prompt_tokens", "completion_tokens", "coalesce_s")

    def __init__(self, registry: ChatRegistry, engine: AsyncEngine, chat_id: str, prompt: Any,
                 params: SamplingParams, max_tokens_given: bool,
                 template_kwargs: dict[str, Any] | None = None,
                 tool_request: ChatCreate | None = None, coalesce_s: float = 0.0) -> None:
        self.registry = registry
        self.coalesce_s = coalesce_s   # the delta-coalescing interval of its connection
        self.engine = engine
        self.id = chat_id
        self.resume_token = secrets.token_urlsafe(16)
        self.request_id = f"ws-{uuid.uuid4().hex}"
        self.prompt = prompt
        self.params = params
        self.template_kwargs = template_kwargs
        self.tool_request = tool_request   # the chat.create, when it brought tools or tool_choice
        self.tool_plan: ToolPlan | None = None            # set by _plan_tools
        self.tool_parsers: dict[int, ToolCallParser] = {}  # by choice
        self.tool_called: set[int] = set()                 # choices that made a tool call
        self.max_tokens_given = max_tokens_given
        self.conn: Connection | None = None
        self.gen = 0                  # bumped on every attach/detach: stale queue entries
        self.inflight = 0             # frames queued on self.conn, not yet written
        self.space = asyncio.Event()
        self.space.set()
        self.history: deque[tuple[int, str, int]] = deque()   # (seq, frame, its bytes)
        self.history_bytes = 0
        self.seq = 0
        self.detach_seq = 0           # the last seq produced before the connection dropped
        self.submitted = False
        self.cancel_requested = False
        self.finished = False
        self.error: ErrorEvent | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    # ---- attachment --------------------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        old = self.conn
        if old is not None and old.chats.get(self.id) is self:
            del old.chats[self.id]
        self.conn = conn
        conn.chats[self.id] = self
        self.registry.detached.pop(self.resume_token, None)
        self.gen += 1
        self.inflight = 0
        self.space.set()
        if not self.finished and self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def detach(self) -> None:
        if self.conn is not None and self.conn.chats.get(self.id) is self:
            del self.conn.chats[self.id]
        self.conn = None
        self.detach_seq = self.seq
        self.gen += 1
        self.inflight = 0
        self.space.set()
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(
                self.registry.settings.resume_window_s, self.end_retention)
        self.registry.keep_detached(self)

    def end_retention(self) -> None:
        """The resume window passed (detached) or the retention of a finished chat ended."""
        self.timer = None
        if self.conn is not None and not self.finished:
            return
        self.forget()
        if self.task is not None and not self.task.done():
            self.task.cancel()   # leaving engine.stream aborts the request: its blocks are freed

    def forget(self) -> None:
        chats = self.registry.by_token
        if chats.get(self.resume_token) is self:
            del chats[self.resume_token]
        self.registry.detached.pop(self.resume_token, None)
        if self.conn is not None:
            if self.conn.chats.get(self.id) is self:
                del self.conn.chats[self.id]
            self.conn = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.history.clear()
        self.history_bytes = 0

    # ---- output ------------------------------------------------------------------------

    def _record(self, frame: bytes) -> None:
        """Keep a numbered frame for resume and queue it on the connection, in one step.

        The history is bounded by resume_buffer_bytes: the oldest frames go first, but a
        detached chat never drops what it produced since the drop (nobody has seen it); when
        that alone outgrows the bound, the chat is cancelled.
        """
        text, size = frame.decode(), len(frame)
        history = self.history
        history.append((self.seq, text, size))
        self.history_bytes += size
        conn = self.conn
        limit = self.registry.settings.resume_buffer_bytes
        if self.history_bytes > limit:
            keep_from = self.seq if conn is not None else self.detach_seq + 1
            while self.history_bytes > limit and history[0][0] < keep_from:
                self.history_bytes -= history.popleft()[2]
            if self.history_bytes > limit and conn is None:
                raise _Overflow
        if conn is not None:
            self.inflight += 1
            conn.enqueue(self, self.gen, text)

    def _control(self, frame: str) -> None:
        """An unnumbered frame (chat.created, error): to the current connection, if any."""
        if self.conn is not None:
            self.conn.enqueue(None, 0, frame)

    def _fail(self, code: str, message: str, retry_after: float | None = None) -> None:
        """End the chat with an error event; kept for a resume attempt if nobody hears it now."""
        self.error = ErrorEvent(self.id, code, message, retry_after)
        self._control(_frame(self.error))

    def _tool_parser(self, index: int) -> ToolCallParser | None:
        """Choice ``index``'s tool-call parser (each choice parses its own output)."""
        parser = self.tool_parsers.get(index)
        if parser is None and self.tool_plan is not None:
            parser = self.tool_plan.parser()
            if parser is not None:
                self.tool_parsers[index] = parser
        return parser

    def _push_delta(self, index: int, delta: OutputDelta) -> None:
        text, tool_calls = delta.text, None
        parser = self._tool_parser(index)
        if parser is not None:
            parsed = parser.feed(delta.text)
            if delta.finish_reason is not None:
                parsed.extend(parser.finish())
            text = parsed.content
            if parsed.tool_calls:
                self.tool_called.add(index)
                tool_calls = openai_tool_call_deltas(parsed.tool_calls)
        if not (delta.token_ids or text or tool_calls or delta.logprobs):
            return
        self.seq += 1
        self.completion_tokens += len(delta.token_ids)
        logprobs = None
        if delta.logprobs is not None:
            logprobs = [LogprobEntry(lp.logprob, lp.top_token_ids, lp.top_logprobs)
                        for lp in delta.logprobs]
        self._record(_encode(ChatDelta(self.id, self.seq, text, delta.token_ids, logprobs,
                                       tool_calls, index)))

    def _push_done(self, finish_reasons: dict[int, str], usages: dict[int, Usage]) -> None:
        """The chat's end: the prompt counted once, every choice's completion tokens."""
        self.seq += 1
        if len(usages) == len(finish_reasons) and usages:
            prompt_tokens = next(iter(usages.values())).prompt_tokens
            completion_tokens = sum(u.completion_tokens for u in usages.values())
            cached_tokens = usages[0].cached_tokens if 0 in usages else 0
        else:
            prompt_tokens, completion_tokens, cached_tokens = (self.prompt_tokens,
                                                               self.completion_tokens, 0)
        usage = ChatUsage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
                          cached_tokens)
        reasons = [finish_reasons[i] for i in sorted(finish_reasons)]
        if len(reasons) == 1:
            self._record(_encode(ChatDone(self.id, self.seq, reasons[0], usage)))
            return
        summary = ("cancelled" if "cancelled" in reasons else
                   "length" if "length" in reasons else
                   "tool_calls" if "tool_calls" in reasons else "stop")
        self._record(_encode(ChatDone(self.id, self.seq, summary, usage, reasons)))

    async def _flow(self) -> None:
        """Wait while too many of this chat's frames are queued on its connection."""
        while self.inflight >= _CHAT_INFLIGHT and self.conn is not None:
            self.space.clear()
            await self.space.wait()

    # ---- the chat task -----------------------------------------------------------------

    async def _plan_tools(self) -> tuple[SamplingParams, list[dict[str, Any]] | None]:
        """The chat's params and the tools for its template, as its tools and tool_choice ask
        (RequestError for bad ones); sets up the tool-call parser of its output."""
        request = self.tool_request
        if request is None:
            return self.params, None
        plan = await plan_request_tools(self.engine, self.registry.settings.tool_call_parser,
                                        request.tools, request.tool_choice,
                                        request.parallel_tool_calls)
        self.tool_plan = plan
        params = self.params
        if plan.grammar is not None:
            if params.structured_outputs is not None:
                raise RequestError("tool_choice 'required' or a named function constrains the "
                                   "output to tool calls: it cannot be combined with "
                                   "structured_outputs")
            params = msgspec.structs.replace(
                params, structured_outputs=StructuredOutputs(grammar=plan.grammar))
        return params, plan.template_tools

    async def run(self) -> None:
        engine = self.engine
        try:
            try:
                params, tools = await self._plan_tools()
                prompt, params = await prepare(engine, self.prompt, params,
                                               self.max_tokens_given, self.template_kwargs, tools)
            except RequestError as exc:
                self._fail("invalid_request", exc.message)
                return
            self.prompt_tokens = len(prompt.prompt_token_ids)
            self._control(_frame(ChatCreated(self.id, self.resume_token)))
            if self.cancel_requested:
                self._push_done({i: "cancelled" for i in range(params.n)}, {})
                return
            self.submitted = True
            finish_reasons: dict[int, str] = {}
            usages: dict[int, Usage] = {}
            async with contextlib.aclosing(choice_stream(engine, prompt, params, self.request_id,
                                                         coalesce_s=self.coalesce_s)) as stream:
                async for index, delta in stream:
                    self._push_delta(index, delta)
                    reason = delta.finish_reason
                    if reason is not None:
                        if reason not in _FINISH_REASONS:
                            self._fail("generation_error", delta.error or f"finished: {reason}")
                            break
                        finish_reasons[index] = ("tool_calls" if reason == "stop"
                                                 and index in self.tool_called
                                                 else _FINISH_REASONS[reason])
                        if delta.usage is not None:
                            usages[index] = delta.usage
                        if len(finish_reasons) == params.n:
                            self._push_done(finish_reasons, usages)
                            break
                    if self.cancel_requested:   # a cancel that raced the submission
                        await self._abort_requests()
                    if self.inflight >= _CHAT_INFLIGHT:
                        await self._flow()
        except _Overflow:
            self.history.clear()
            self.history_bytes = 0
            self.error = ErrorEvent(
                self.id, "resume_overflow",
                f"chat {self.id!r} was cancelled: its output while disconnected outgrew the "
                f"{self.registry.settings.resume_buffer_bytes}-byte resume buffer")
        except EngineOverloadedError as exc:
            self._fail("overloaded", str(exc), exc.retry_after)
        except EngineDeadError as exc:
            self._fail("engine_dead", str(exc))
        except ValueError as exc:   # input the engine refused at submission
            self._fail("invalid_request", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken chat must not take others down
            log.exception("chat %r failed", self.id)
            self._fail("internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.finished = True
            if self.timer is None and self.registry.by_token.get(self.resume_token) is self:
                with contextlib.suppress(RuntimeError):
                    self.timer = asyncio.get_running_loop().call_later(
                        self.registry.settings.resume_window_s, self.end_retention)

    async def cancel(self) -> None:
        if self.finished or self.cancel_requested:
            return
        self.cancel_requested = True
        if self.submitted:
            await self._abort_requests()   # each choice's stream ends with "abort"

    async def _abort_requests(self) -> None:
        for request_id in choice_request_ids(self.request_id, self.params.n):
            await self.engine.abort(request_id)

    def replay(self, conn: Connection, after_seq: int) -> None:
        """Move the chat to ``conn`` and queue its frames after ``after_seq``, in one step.

        A finished chat always answers with its chat.done, even to a client that claims to
        have seen it (after_seq at or past the end): a resume never goes unanswered.
        """
        self.attach(conn)
        frames = [frame for seq, frame, _ in self.history if seq > after_seq]
        if not frames and self.finished and self.error is None and self.history:
            frames = [self.history[-1][1]]
        for frame in frames:
            self.inflight += 1
            conn.enqueue(self, self.gen, frame)


class Connection:
    """One WebSocket: its chats and the single writer that sends their frames in order."""

    def __init__(self, websocket: WebSocket, registry: ChatRegistry, engine: AsyncEngine,
                 gate: ShutdownGate, coalesce_s: float = 0.0) -> None:
        self.websocket = websocket
        self.coalesce_s = coalesce_s
        self.registry = registry
        self.engine = engine
        self.gate = gate
        self.queue: deque[tuple[Chat | None, int, str]] = deque()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.chats: dict[str, Chat] = {}    # by id, oldest first: created here or resumed
        self.closed = False
        self.writer: asyncio.Task | None = None

    def start(self) -> None:
        self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    def enqueue(self, chat: Chat | None, gen: int, frame: str) -> None:
        if self.closed:
            return
        self.queue.append((chat, gen, frame))
        self.wake.set()

    def send_error(self, chat_id: str | None, code: str, message: str) -> None:
        self.enqueue(None, 0, _error_frame(chat_id, code, message))

    async def _write_loop(self) -> None:
        queue, send = self.queue, self.websocket.send_text
        try:
            while True:
                if not queue:
                    self.drained.set()
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                chat, gen, frame = queue.popleft()
                await send(frame)
                if chat is not None and chat.gen == gen:
                    chat.inflight -= 1
                    if chat.inflight < _CHAT_INFLIGHT:
                        chat.space.set()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the peer went away: the reader cleans up
            self.close()

    async def wait_drained(self) -> None:
        if len(self.queue) > _CONTROL_BACKLOG:
            self.drained.clear()
            await self.drained.wait()

    def close(self) -> None:
        """The connection is gone: its chats run on detached, awaiting a resume."""
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.drained.set()
        if self.writer is not None and self.writer is not asyncio.current_task():
            self.writer.cancel()
        for chat in list(self.chats.values()):
            chat.detach()

    def running_chats(self) -> int:
        return sum(not chat.finished for chat in self.chats.values())

    def _refuse_more_chats(self, chat_id: str) -> bool:
        """Send an error if this connection already runs its maximum of chats."""
        limit = self.registry.settings.max_chats_per_connection
        if self.running_chats() < limit:
            return False
        self.send_error(chat_id, "too_many_chats",
                        f"this connection already runs {limit} chats; wait for one to end")
        return True

    def _make_room(self) -> None:
        """Forget the oldest finished chats beyond max_kept_chats_per_connection - 1."""
        limit = self.registry.settings.max_kept_chats_per_connection
        finished = [chat for chat in self.chats.values() if chat.finished]
        for chat in finished[:max(0, len(self.chats) - limit + 1)]:
            chat.forget()

    def _take_id_for(self, chat: Chat) -> bool:
        """Free the chat's id on this connection for a chat moving here: a finished chat holding
        it is forgotten, a running one is a duplicate (error sent, False)."""
        existing = self.chats.get(chat.id)
        if existing is None or existing is chat:
            return True
        if not existing.finished:
            self.send_error(chat.id, "duplicate_id", f"chat {chat.id!r} is already running")
            return False
        existing.forget()
        return True

    # ---- client messages ---------------------------------------------------------------

    async def handle(self, data: str | bytes) -> None:
        limit = self.registry.settings.ws_max_message_bytes
        size = len(data) if isinstance(data, bytes) or len(data) * 4 <= limit \
            else len(data.encode())
        if size > limit:
            self.send_error(None, "message_too_large",
                            f"message of {size} bytes is over the {limit}-byte limit")
            return
        max_depth = self.registry.settings.max_json_depth
        if json_too_deep(data, max_depth):
            self.send_error(None, "invalid_request", f"JSON nested deeper than {max_depth} levels")
            return
        try:
            message = _decoder.decode(data)
        except msgspec.ValidationError as exc:
            chat_id, code = _salvage(data)
            self.send_error(chat_id, code, f"invalid message: {exc}")
            return
        except msgspec.DecodeError as exc:
            self.send_error(None, "malformed_json", f"malformed JSON: {exc}")
            return
        kind = type(message)
        if kind is ChatCreate:
            self._create(message)
        elif kind is ChatCancel:
            chat = self.chats.get(message.id)
            if chat is None:
                self.send_error(message.id, "unknown_chat",
                                f"no chat with id {message.id!r} on this connection")
            else:
                await chat.cancel()
        elif kind is ChatResume:
            self._resume(message)
        elif kind is Ping:
            self.enqueue(None, 0, _PONG)
        # Auth once authenticated (or with no API key): nothing to do.

    def _create(self, message: ChatCreate) -> None:
        chat_id = message.id
        if not chat_id:
            self.send_error(None, "invalid_message", "chat id must be a non-empty string")
            return
        if self.gate.draining:
            self.send_error(chat_id, "shutting_down", "the server is shutting down")
            return
        existing = self.chats.get(chat_id)
        if existing is not None and not existing.finished:
            self.send_error(chat_id, "duplicate_id", f"chat {chat_id!r} is already running")
            return
        if self._refuse_more_chats(chat_id):
            return
        if (message.messages is None) == (message.prompt is None):
            self.send_error(chat_id, "invalid_message",
                            "chat.create needs exactly one of 'messages' and 'prompt'")
            return
        unknown = message.params.keys() - _PARAM_FIELDS
        if unknown:
            self.send_error(chat_id, "invalid_params",
                            f"unknown sampling parameters: {sorted(unknown)}")
            return
        try:
            params = sampling_params(message.params, self.engine.default_sampling_fields)
        except RequestError as exc:
            self.send_error(chat_id, "invalid_params", exc.message)
            return
        prompt: Any = message.messages
        if prompt is None:
            prompt = message.prompt
            if isinstance(prompt, list):
                prompt = {"prompt_token_ids": prompt}
        else:
            try:
                check_messages(prompt)
            except RequestError as exc:
                self.send_error(chat_id, "invalid_request", exc.message)
                return
        if existing is not None:
            existing.forget()   # a finished chat's id may be used again
        self._make_room()
        if message.prompt is not None and (message.tools or message.tool_choice is not None):
            self.send_error(chat_id, "invalid_request",
                            "tools and tool_choice apply to chats with messages only")
            return
        with_tools = message.tools or message.tool_choice is not None
        chat = Chat(self.registry, self.engine, chat_id, prompt, params,
                    "max_tokens" in message.params, message.chat_template_kwargs,
                    message if with_tools else None, self.coalesce_s)
        self.registry.by_token[chat.resume_token] = chat
        chat.attach(self)
        chat.task = asyncio.get_running_loop().create_task(chat.run())

    def _resume(self, message: ChatResume) -> None:
        if message.token is not None:
            chat = self.registry.by_token.get(message.token)
            if chat is not None and chat.id != message.id:
                chat = None
        else:
            chat = self.chats.get(message.id)
        if chat is None:
            self.send_error(message.id, "unknown_chat",
                            f"no chat with id {message.id!r} (finished or expired? from another "
                            "connection, chat.resume needs the chat's resume token)")
            return
        if message.after_seq > chat.seq and not chat.finished:
            self.send_error(chat.id, "invalid_message",
                            f"after_seq {message.after_seq} is past the chat's last seq "
                            f"{chat.seq}")
            return
        history = chat.history
        if history and history[0][0] > message.after_seq + 1:
            self.send_error(message.id, "resume_gap",
                            f"deltas after seq {message.after_seq} are no longer kept "
                            f"(the oldest kept is {history[0][0]})")
            return
        if chat.conn is not self:
            if not chat.finished and self._refuse_more_chats(chat.id):
                return
            if not self._take_id_for(chat):
                return
            self._make_room()
        chat.replay(self, message.after_seq)
        if chat.error is not None and chat.finished:
            self.enqueue(None, 0, _frame(chat.error))
            chat.forget()


def _salvage(data: str | bytes) -> tuple[str | None, str]:
    try:
        envelope = msgspec.json.decode(data, type=_Envelope)
    except msgspec.MsgspecError:
        return None, "invalid_message"
    chat_id = envelope.id if isinstance(envelope.id, str) else None
    code = "invalid_message" if envelope.type in _CLIENT_TYPES else "unknown_type"
    return chat_id, code


# ---- the endpoint ---------------------------------------------------------------------------


async def _refuse(websocket: WebSocket, message: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(_error_frame(None, "unauthorized", message))
        await websocket.close(code=1008)


async def _authenticate(websocket: WebSocket, settings: GatewaySettings) -> bool:
    api_key = settings.api_key
    if not api_key:
        return True
    header_ok = check_authorization(websocket.scope["headers"], api_key)
    if header_ok is not None:
        if header_ok:
            return True
        await _refuse(websocket, "invalid API key")
        return False
    try:
        message = await asyncio.wait_for(websocket.receive(), settings.ws_auth_timeout_s)
    except TimeoutError:
        await _refuse(websocket, f"no auth message within {settings.ws_auth_timeout_s} s")
        return False
    if message["type"] == "websocket.disconnect":
        return False
    data = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    try:
        auth = _decoder.decode(data) if len(data) <= settings.ws_max_message_bytes \
            and not json_too_deep(data, settings.max_json_depth) else None
    except msgspec.MsgspecError:
        auth = None
    if not isinstance(auth, Auth):
        await _refuse(websocket, "authenticate first: Authorization: Bearer <key> in the "
                                 "handshake, or a first message {\"type\": \"auth\", ...}")
        return False
    if not key_matches(auth.token, api_key):
        await _refuse(websocket, "invalid API key")
        return False
    return True


async def _close(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(_error_frame(None, code, message))
        await websocket.close(code=close_code)


async def _receive_until_idle(websocket: WebSocket, conn: Connection,
                              idle_timeout_s: float) -> dict[str, Any] | None:
    """The next message; None once no chat has run and no message came for idle_timeout_s."""
    while True:
        try:
            return await asyncio.wait_for(websocket.receive(), idle_timeout_s)
        except TimeoutError:
            if conn.running_chats() == 0:
                return None


def _coalesce_ms(websocket: WebSocket, settings: GatewaySettings) -> float | None:
    """The connection's delta-coalescing interval: ?coalesce_ms=N, else the server's; None if
    the query's value is not one."""
    value = websocket.query_params.get("coalesce_ms")
    if value is None:
        return settings.stream_coalesce_ms
    try:
        ms = float(value)
    except ValueError:
        return None
    return ms if 0 <= ms <= MAX_COALESCE_MS else None


async def websocket_endpoint(websocket: WebSocket) -> None:
    state = websocket.app.state
    registry: ChatRegistry = state.chats
    gate: ShutdownGate = state.shutdown_gate
    settings = registry.settings
    await websocket.accept()
    if gate.draining:
        await _close(websocket, "shutting_down", "the server is shutting down", 1001)
        return
    coalesce_ms = _coalesce_ms(websocket, settings)
    if coalesce_ms is None:
        await _close(websocket, "invalid_request",
                     f"coalesce_ms must be a number of milliseconds from 0 to {MAX_COALESCE_MS:g}",
                     1008)
        return
    if not await _authenticate(websocket, settings):
        return
    conn = Connection(websocket, registry, state.engine, gate, coalesce_ms / 1000)
    conn.start()
    try:
        while True:
            message = await _receive_until_idle(websocket, conn, settings.ws_idle_timeout_s)
            if message is None:
                conn.close()
                await _close(websocket, "idle_timeout",
                             f"no chat and no message for {settings.ws_idle_timeout_s} s", 1001)
                break
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            await conn.handle(data)
            if len(conn.queue) > _CONTROL_BACKLOG:
                await conn.wait_drained()
    except WebSocketDisconnect:
        pass
    finally:
        conn.close()
