"""The OpenAI-compatible HTTP API: chat completions, completions (both with SSE streaming),
models, health, version and Prometheus metrics. Errors use OpenAI's error JSON shape, unknown
routes and methods included."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.request_state import OutputDelta, Usage
from streamvlm.errors import EngineDeadError, EngineOverloadedError
from streamvlm.gateway.admission import AdmissionTurns, turn_taken
from streamvlm.gateway.auth import check_authorization
from streamvlm.gateway.common import RequestError, check_messages, choice_stream, prepare, sampling_params
from streamvlm.gateway.json_depth import json_too_deep
from streamvlm.gateway.openai_logprobs import (CompletionLogprobs, chat_logprobs, completion_logprobs,
                                               vllm_prompt_logprobs)
from streamvlm.gateway.openai_schemas import LENIENT, ChatCompletionRequest, CompletionRequest
from streamvlm.gateway.settings import GatewaySettings
from streamvlm.gateway.sse import ClientWatch, EventStream, LastEvents
from streamvlm.gateway.tool_parsers import ToolCallParser
from streamvlm.gateway.tools import (ToolPlan, openai_tool_call_deltas, openai_tool_calls,
                                     plan_request_tools)
from streamvlm.contract.protocol import PromptLogprobs
from streamvlm.contract.sampling import SamplingParams
from streamvlm.inputs.processor import PreparedPrompt
from streamvlm.outputs import RequestOutput

_json = msgspec.json.Encoder()
_T = TypeVar("_T")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(message: str, status: int = 400, kind: str = "invalid_request_error",
                   param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": {"message": message, "type": kind, "param": param,
                                    "code": status}}, status, headers)


def overloaded_response(exc: EngineOverloadedError) -> Response:
    return error_response(str(exc), 429, "overloaded",
                          headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))})


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def _admission(request: Request) -> AdmissionTurns:
    return request.app.state.admission


# The routes that generate: their requests are admitted in turns (gateway/admission.py).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


async def _take_turn(request: Request) -> None:
    """The request's admission turn, unless the server's AdmissionGate gave it one already."""
    if not turn_taken(request.scope):
        await _admission(request).turn()


def served_model_name(request: Request) -> str:
    return _settings(request).served_model_name or _engine(request).config.model.model


class BearerAuth:
    """Every HTTP route but ``open_paths`` needs ``Authorization: Bearer <key>`` when a key is
    set. (WebSocket connections authenticate in the WebSocket endpoint.)"""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: frozenset[str]) -> None:
        self.app = app
        self.api_key = api_key or None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.api_key is not None and scope["type"] == "http"
                and scope["path"] not in self.open_paths
                and not check_authorization(scope["headers"], self.api_key)):
            response = error_response("missing or invalid API key", 401, "authentication_error")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def open_paths(settings: GatewaySettings) -> frozenset[str]:
    """Routes answered without the API key: /health for probes, /metrics for scrapers unless
    metrics_auth is "key"."""
    return frozenset({"/health"} | ({"/metrics"} if settings.metrics_auth == "none" else set()))


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$\.?([^`]*)`)?")


async def read_json(request: Request, schema: type) -> Any:
    """The body decoded as ``schema`` (its lenient variant with ignore_unknown_fields), bounded
    in size and depth; a field the schema does not know is a 400 naming it."""
    if _settings(request).ignore_unknown_fields:
        schema = LENIENT.get(schema, schema)
    limit = _settings(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body over the {limit}-byte limit", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body over the {limit}-byte limit", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    max_depth = _settings(request).max_json_depth
    if json_too_deep(body, max_depth):
        raise RequestError(f"JSON nested deeper than {max_depth} levels")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        unknown = _UNKNOWN_FIELD.match(str(exc))
        if unknown is not None:
            name = ".".join(filter(None, (unknown[2], unknown[1])))
            raise RequestError(f"unsupported field {name!r}: this server does not implement it "
                               f"(a server started with --ignore-unknown-fields ignores fields "
                               f"it does not know)", param=name) from exc
        raise RequestError(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from exc


class _ClientGone(Exception):
    """The client disconnected before its response began: its request was aborted."""


def handles_errors(handler: Callable[[Request], Awaitable[Response]]
                    ) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as exc:
            return error_response(exc.message, exc.status, param=exc.param)
        except EngineOverloadedError as exc:
            return overloaded_response(exc)
        except EngineDeadError as exc:
            return error_response(str(exc), 503, "engine_dead")
        except ValueError as exc:   # input the engine refused at submission
            return error_response(str(exc), 400)
        except _ClientGone:
            return Response(status_code=499)   # nobody reads it; uvicorn drops it
    wrapped.__name__ = handler.__name__
    return wrapped


def check_model(request: Request, model: str | None) -> str:
    name = served_model_name(request)
    if model is not None and model != name:
        raise RequestError(f"model {model!r} does not exist; this server serves {name!r}", 404,
                           param="model")
    return name


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await ``work`` in this task; if the client goes away first, it is cancelled (leaving the
    engine call aborts its request) and _ClientGone raised."""
    watch = ClientWatch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.absorb():
            raise _ClientGone from None
        raise
    finally:
        watch.close()


async def _all_of(awaitables: list[Awaitable[_T]]) -> list[_T]:
    """Await them all concurrently; the first failure cancels the rest and is raised. One is
    awaited in this task: nothing else runs before it starts."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _prefetched(stream: AsyncIterator[_T]) -> AsyncIterator[_T]:
    """``stream`` with its first item already received (a refusal at submission is raised here)."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def items() -> AsyncIterator[_T]:
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item
    return items()


async def _started(request: Request, streams: list[AsyncIterator[_T]]
                   ) -> tuple[list[AsyncIterator[_T]], ClientWatch]:
    """The streams, each with its first item received before the response starts, so that a
    refusal at submission (overloaded, bad input, engine dead) is a status code rather than an
    error event after a 200; if one is refused, or the client leaves, all are closed (aborted).
    The watch on the client goes on with the response (see sse.EventStream)."""
    watch = ClientWatch(request.receive)
    try:
        return await _all_of([_prefetched(s) for s in streams]), watch
    except BaseException as exc:
        watch.close()
        for stream in streams:
            with contextlib.suppress(RuntimeError):   # one still running where it was cancelled
                await stream.aclose()
        if isinstance(exc, asyncio.CancelledError) and watch.absorb():
            raise _ClientGone from None
        raise


async def _merged(streams: list[AsyncIterator[tuple[int, OutputDelta]]], n: int
                  ) -> AsyncIterator[tuple[int, OutputDelta]]:
    """The choice streams of several prompts as their deltas come, choice j of prompt i with
    index i * n + j; leaving early closes (aborts) them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for item in streams[0]:
                yield item
        return
    queue: asyncio.Queue[tuple[int, OutputDelta] | BaseException | None] = asyncio.Queue()

    async def pump(prompt_index: int, stream: AsyncIterator[tuple[int, OutputDelta]]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for index, delta in stream:
                    queue.put_nowait((prompt_index * n + index, delta))
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _generate_choices(engine: AsyncEngine, prompt: Any, params: SamplingParams
                            ) -> list[RequestOutput]:
    if params.n == 1:
        outs = [await engine.generate(prompt, params)]
    else:
        outs = await engine.generate_choices(prompt, params)
    return [_check_generated(out) for out in outs]


def _coalesce_s(request: Request) -> float:
    """The serve flag --stream-coalesce-ms, in seconds (0: every delta as it comes)."""
    return _settings(request).stream_coalesce_ms / 1000


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _choices_usage(outs: list[list[RequestOutput]]) -> dict[str, Any]:
    """Each prompt counted once, the completions of every choice summed."""
    return _usage(Usage(sum(len(o[0].prompt_token_ids) for o in outs),
                        sum(len(out.token_ids) for o in outs for out in o),
                        sum(o[0].num_cached_tokens for o in outs)))


def _finish_reason(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


def _check_generated(out: RequestOutput) -> RequestOutput:
    """A request the worker ended with an error (an image it could not encode, say) is a 400."""
    if out.finish_reason == "error":
        raise RequestError(out.error or "the request failed in the worker")
    return out


# ---- routes -----------------------------------------------------------------------------------

async def health(request: Request) -> Response:
    report = await _engine(request).health()
    body = {"status": "ok" if report.healthy else "unhealthy",
            "groups": msgspec.to_builtins(report.groups)}
    return json_response(body, 200 if report.healthy else 503)


async def metrics(request: Request) -> Response:
    from streamvlm.metrics import render_metrics

    body, content_type = await render_metrics(_engine(request))
    return Response(body, media_type=content_type)


def _model_card(request: Request) -> dict[str, Any]:
    return {"id": served_model_name(request), "object": "model", "created": int(time.time()),
            "owned_by": "streamvlm", "max_model_len": _engine(request).processor.max_model_len}


async def models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(request)]})


@handles_errors
async def model(request: Request) -> Response:
    check_model(request, request.path_params["model_id"])
    return json_response(_model_card(request))


async def version(request: Request) -> Response:
    from streamvlm import __version__

    return json_response({"version": __version__})


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, a method the route does not take) in OpenAI's
    shape instead of plain text."""
    assert isinstance(exc, HTTPException)
    messages = {404: f"no route {request.url.path!r}",
                405: f"method {request.method} is not allowed on {request.url.path!r}"}
    return error_response(messages.get(exc.status_code, exc.detail), exc.status_code,
                          "not_found" if exc.status_code == 404 else "invalid_request_error",
                          headers=exc.headers)


@handles_errors
async def chat_completions(request: Request) -> Response:
    await _take_turn(request)
    body: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
    model = check_model(request, body.model)
    check_messages(body.messages)
    _check_stream_fields(body)
    fields = body.sampling_fields()
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if body.logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = body.top_logprobs or 0
    engine = _engine(request)
    tools = await plan_request_tools(engine, _settings(request).tool_call_parser, body.tools,
                                     body.tool_choice, body.parallel_tool_calls)
    if tools.grammar is not None:
        if "structured_outputs" in fields:
            raise RequestError("tool_choice 'required' or a named function constrains the output "
                               "to tool calls: it cannot be combined with response_format or "
                               "other structured output", param="tool_choice")
        fields["structured_outputs"] = {"grammar": tools.grammar}
    prompt, params = await prepare(engine, body.messages, sampling_params(fields, engine.default_sampling_fields),
                                   max_tokens is not None, body.chat_template_kwargs,
                                   tools.template_tools)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        [deltas], watch = await _started(request, [choice_stream(engine, prompt, params,
                                                                 coalesce_s=_coalesce_s(request))])
        usage = _stream_usage(body, [len(prompt.prompt_token_ids)], params.n)
        return EventStream(_chat_chunks(engine, deltas, request_id, created, model, usage,
                                        params.n, tools), watch)
    outs = await _unless_disconnected(request, _generate_choices(engine, prompt, params))
    response = {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, **_chat_message(tools, out),
                     "logprobs": chat_logprobs(engine.tokenizer, out.token_ids, out.logprobs)}
                    for i, out in enumerate(outs)],
        "usage": _choices_usage([outs])}
    if params.prompt_logprobs is not None and outs[0].prompt_logprobs is not None:
        response["prompt_logprobs"] = vllm_prompt_logprobs(engine.tokenizer, outs[0].prompt_token_ids,
                                                           outs[0].prompt_logprobs)
    return json_response(response)


def _check_stream_fields(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.stream and body.prompt_logprobs is not None:
        # As vLLM: prompt logprobs come whole with a non-streamed response.
        raise RequestError("prompt_logprobs are not available with stream: true",
                           param="prompt_logprobs")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _completion_prompts(prompt: str | list[Any], limit: int) -> list[str | dict[str, list[int]]]:
    """The prompts of a completions call: a string, token ids, or a list of either (of one
    kind), at most ``limit`` of them."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(map(_is_token_id, prompt)):
        return [{"prompt_token_ids": prompt}]
    if prompt and all(isinstance(p, str) for p in prompt):
        prompts: list[str | dict[str, list[int]]] = list(prompt)
    elif prompt and all(isinstance(p, list) and all(map(_is_token_id, p)) for p in prompt):
        prompts = [{"prompt_token_ids": p} for p in prompt]
    else:
        raise RequestError("prompt must be a string, a list of token ids, or a non-empty list of "
                           "strings or of token-id lists", param="prompt")
    if len(prompts) > limit:
        raise RequestError(f"{len(prompts)} prompts in one request; this server takes at most "
                           f"{limit} (max_prompts_per_request)", param="prompt")
    return prompts


@dataclass(slots=True)
class _Echo:
    """A prompt as echo puts it before its completions: its text and its token ids."""

    text: str
    token_ids: list[int]


def _echo(tokenizer: Any, prompt: str | dict[str, list[int]], prepared: PreparedPrompt) -> _Echo:
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prepared.prompt_token_ids)
    return _Echo(text, prepared.prompt_token_ids)


def _completion_choice(tokenizer: Any, index: int, out: RequestOutput, echo: _Echo | None,
                       with_prompt_logprobs: bool) -> dict[str, Any]:
    text, offset, echoed = out.text, 0, None
    if echo is not None:
        text, offset = echo.text + out.text, len(echo.text)
        if out.logprobs is not None:
            echoed = CompletionLogprobs.of_prompt(tokenizer, echo.token_ids, out.prompt_logprobs)
    choice = {"index": index, "text": text,
              "logprobs": completion_logprobs(tokenizer, out.token_ids, out.logprobs, offset, echoed),
              "finish_reason": _finish_reason(out.finish_reason)}
    if with_prompt_logprobs and out.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, out.prompt_token_ids,
                                                         out.prompt_logprobs)
    return choice


def _chat_message(tools: ToolPlan, out: RequestOutput) -> dict[str, Any]:
    """A whole choice's message and finish_reason, its tool calls parsed out of the text."""
    parser = tools.parser()
    finish_reason = _finish_reason(out.finish_reason)
    if parser is None:
        return {"message": {"role": "assistant", "content": out.text},
                "finish_reason": finish_reason}
    content, calls = parser.parse(out.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = openai_tool_calls(calls)
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return {"message": message, "finish_reason": finish_reason}


@handles_errors
async def completions(request: Request) -> Response:
    await _take_turn(request)
    body: CompletionRequest = await read_json(request, CompletionRequest)
    model = check_model(request, body.model)
    prompts = _completion_prompts(body.prompt, _settings(request).max_prompts_per_request)
    _check_stream_fields(body)
    fields = body.sampling_fields()
    fields["max_tokens"] = body.max_tokens if body.max_tokens is not None else 16
    if body.logprobs is not None:
        fields["logprobs"] = True
        fields["top_logprobs"] = body.logprobs
        if body.echo:   # the echoed prompt's tokens get logprobs too, as vLLM's
            fields["prompt_logprobs"] = max(body.logprobs, body.prompt_logprobs or 0)
    engine = _engine(request)
    if body.echo and engine.tokenizer is None:
        raise RequestError("echo needs a tokenizer (the server runs with skip_tokenizer_init)",
                           param="echo")
    params = sampling_params(fields, engine.default_sampling_fields)
    prepared = await _all_of([prepare(engine, prompt, params, True) for prompt in prompts])
    echoes = ([_echo(engine.tokenizer, prompt, p) for prompt, (p, _) in zip(prompts, prepared)]
              if body.echo else None)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    n = params.n
    if body.stream:
        streams, watch = await _started(request, [choice_stream(engine, p, prm,
                                                                coalesce_s=_coalesce_s(request))
                                                   for p, prm in prepared])
        usage = _stream_usage(body, [len(p.prompt_token_ids) for p, _ in prepared], n)
        return EventStream(_completion_chunks(engine, _merged(streams, n), request_id, created,
                                              model, usage, n, len(streams) * n, echoes), watch)
    outs = await _unless_disconnected(
        request, _all_of([_generate_choices(engine, p, prm) for p, prm in prepared]))
    return json_response({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [_completion_choice(engine.tokenizer, i * n + j, out,
                                       echoes[i] if echoes is not None else None,
                                       body.prompt_logprobs is not None)
                    for i, prompt_outs in enumerate(outs) for j, out in enumerate(prompt_outs)],
        "usage": _choices_usage(outs)})


# ---- server-sent events -----------------------------------------------------------------------

def _event(body: Any) -> bytes:
    return b"data: " + _json.encode(body) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class _StreamUsage:
    """Usage in a stream (stream_options.include_usage): a last chunk with the totals; with
    continuous_usage_stats, every chunk also carries its choice's usage so far (its prompt's
    tokens and its own completion tokens), as vLLM's."""

    prompt_tokens: list[int]     # by prompt
    n: int                       # choices per prompt: choice i belongs to prompt i // n
    continuous: bool

    def so_far(self, index: int, completion_tokens: int) -> dict[str, Any] | None:
        if not self.continuous:
            return None
        prompt_tokens = self.prompt_tokens[index // self.n]
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def total(self, finals: dict[int, Usage]) -> Usage:
        """Every prompt once, every choice's completion tokens; cached tokens as each prompt's
        first choice found them."""
        return Usage(sum(self.prompt_tokens), sum(u.completion_tokens for u in finals.values()),
                     sum(u.cached_tokens for i, u in finals.items() if i % self.n == 0))


def _stream_usage(body: ChatCompletionRequest | CompletionRequest, prompt_tokens: list[int],
                  n: int) -> _StreamUsage | None:
    options = body.stream_options
    if options is None or not options.include_usage:
        return None
    return _StreamUsage(prompt_tokens, n, options.continuous_usage_stats)


def _stream_events(deltas: AsyncIterator[tuple[int, OutputDelta]], head: dict[str, Any],
                   usage: _StreamUsage | None, first: list[dict[str, Any]], num_choices: int,
                   choice: Callable[[int, OutputDelta], dict[str, Any] | None]
                   ) -> AsyncIterator[bytes]:
    """SSE events of one streamed call: the first choices given, one chunk per delta with
    content (its choice's index; none where ``choice`` gives None), with ``usage`` a last chunk
    with the totals and no choices, and [DONE]. Errors after the response started become an
    error event before [DONE]. The events after the last of the ``num_choices`` choices has
    finished go out together, as LastEvents."""
    completion_tokens: dict[int, int] = {}

    def chunk(body_choice: dict[str, Any]) -> bytes:
        out = {**head, "choices": [body_choice]}
        if usage is not None:
            index = body_choice["index"]
            out["usage"] = usage.so_far(index, completion_tokens.get(index, 0))
        return _event(out)

    async def events() -> AsyncIterator[bytes]:
        # The opening chunks go out with the first event after them: one write, not two.
        pending = b"".join(chunk(opening) for opening in first)
        finals: dict[int, Usage] = {}
        unfinished = num_choices
        try:
            async for index, delta in deltas:
                completion_tokens[index] = completion_tokens.get(index, 0) + len(delta.token_ids)
                if delta.usage is not None:
                    finals[index] = delta.usage
                if delta.finish_reason == "error":
                    yield LastEvents(pending + _event({"error": {
                        "message": delta.error or "the request failed in the worker",
                        "type": "invalid_request_error", "code": 400}}) + _DONE)
                    return
                if delta.finish_reason is not None:
                    unfinished -= 1
                if delta.text or delta.finish_reason is not None or delta.logprobs:
                    body = choice(index, delta)
                    if body is not None:
                        pending += chunk(body)
                        if unfinished:
                            yield pending
                            pending = b""
        except EngineDeadError as exc:
            yield LastEvents(_event({"error": {"message": str(exc), "type": "engine_dead", "code": 503}})
                             + _DONE)
            return
        if usage is not None and finals:
            pending += _event({**head, "choices": [], "usage": _usage(usage.total(finals))})
        yield LastEvents(pending + _DONE)
    return events()


def _chat_chunks(engine: AsyncEngine, deltas: AsyncIterator[tuple[int, OutputDelta]],
                 request_id: str, created: int, model: str, usage: _StreamUsage | None,
                 n: int = 1, tools: ToolPlan | None = None) -> AsyncIterator[bytes]:
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None} for i in range(n)]
    parsers: dict[int, ToolCallParser] = {}
    called: set[int] = set()   # choices that made a tool call

    def message_delta(index: int, delta: OutputDelta) -> dict[str, Any]:
        if tools is None or tools.format is None:
            return {"content": delta.text} if delta.text else {}
        parser = parsers.get(index) or parsers.setdefault(index, tools.parser())
        parsed = parser.feed(delta.text)
        if delta.finish_reason is not None:
            parsed.extend(parser.finish())
        body: dict[str, Any] = {"content": parsed.content} if parsed.content else {}
        if parsed.tool_calls:
            called.add(index)
            body["tool_calls"] = openai_tool_call_deltas(parsed.tool_calls)
        return body

    def choice(index: int, delta: OutputDelta) -> dict[str, Any] | None:
        body = message_delta(index, delta)
        logprobs = chat_logprobs(engine.tokenizer, delta.token_ids, delta.logprobs)
        finish_reason = _finish_reason(delta.finish_reason)
        if finish_reason == "stop" and index in called:
            finish_reason = "tool_calls"
        if not body and logprobs is None and finish_reason is None:
            return None   # text held back by the tool-call parser
        return {"index": index, "delta": body, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return _stream_events(deltas, head, usage, first, n, choice)


def _completion_chunks(engine: AsyncEngine, deltas: AsyncIterator[tuple[int, OutputDelta]],
                       request_id: str, created: int, model: str, usage: _StreamUsage | None,
                       n: int, num_choices: int, echoes: list[_Echo] | None) -> AsyncIterator[bytes]:
    """Completion chunks of ``num_choices`` choices, ``n`` per prompt; with echo, each choice's
    first chunk starts with its prompt (and the prompt tokens' logprobs, which come with the
    prompt's first choice)."""
    head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    tokenizer = engine.tokenizer
    offsets: dict[int, int] = {}
    prompt_logprobs: dict[int, PromptLogprobs] = {}

    def choice(index: int, delta: OutputDelta) -> dict[str, Any]:
        prompt_index = index // n
        if delta.prompt_logprobs is not None:
            prompt_logprobs[prompt_index] = delta.prompt_logprobs
        text, echoed = delta.text, None
        if echoes is not None and index not in offsets:
            echo = echoes[prompt_index]
            text, offsets[index] = echo.text + delta.text, len(echo.text)
            if delta.logprobs is not None:
                echoed = CompletionLogprobs.of_prompt(tokenizer, echo.token_ids,
                                                      prompt_logprobs.get(prompt_index))
        offset = offsets.get(index, 0)
        logprobs = completion_logprobs(tokenizer, delta.token_ids, delta.logprobs, offset, echoed)
        offsets[index] = offset + len(delta.text)
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": _finish_reason(delta.finish_reason)}
    return _stream_events(deltas, head, usage, [], num_choices, choice)
