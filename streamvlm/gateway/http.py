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
from typing import Any, TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.request_state import OutputDelta, Usage
from streamvlm.errors import EngineDeadError, EngineOverloadedError
from streamvlm.gateway.auth import check_authorization
from streamvlm.gateway.common import RequestError, check_messages, prepare, sampling_params
from streamvlm.gateway.json_depth import json_too_deep
from streamvlm.gateway.openai_schemas import LENIENT, ChatCompletionRequest, CompletionRequest
from streamvlm.gateway.settings import GatewaySettings
from streamvlm.outputs import RequestOutput
from streamvlm.contract.protocol import TokenLogprobs

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


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await ``work``; if the client goes away first, cancel it (leaving the engine call aborts
    its request), wait until the cancellation is done and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _generate_or_abort(request: Request, engine: AsyncEngine, prompt: Any,
                             params: Any) -> RequestOutput:
    """engine.generate, aborted if the client goes away first."""
    return await _unless_disconnected(request, engine.generate(prompt, params))


async def _started(request: Request, stream: AsyncIterator[_T]) -> AsyncIterator[_T]:
    """``stream`` with its first item received before the response starts, so that a refusal at
    submission (overloaded, bad input, engine dead) is a status code rather than an error event
    after a 200."""
    try:
        first = await _unless_disconnected(request, anext(stream))
    except BaseException:
        await stream.aclose()
        raise

    async def items() -> AsyncIterator[_T]:
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item
    return items()


async def _indexed(deltas: AsyncIterator[OutputDelta]) -> AsyncIterator[tuple[int, OutputDelta]]:
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            yield 0, delta


async def _started_choices(request: Request, engine: AsyncEngine, prompt: Any, params: Any
                           ) -> AsyncIterator[tuple[int, OutputDelta]]:
    """Indexed deltas of every choice, the first received before the response starts; n == 1
    is the plain stream with index 0."""
    coalesce_s = _settings(request).stream_coalesce_ms / 1000
    if params.n == 1:
        return await _started(request, _indexed(engine.stream(prompt, params,
                                                               coalesce_s=coalesce_s)))
    return await _started(request, engine.stream_choices(prompt, params, coalesce_s=coalesce_s))


async def _generate_choices_or_abort(request: Request, engine: AsyncEngine, prompt: Any,
                                     params: Any) -> list[RequestOutput]:
    if params.n == 1:
        return [_check_generated(await _generate_or_abort(request, engine, prompt, params))]
    outs = await _unless_disconnected(request, engine.generate_choices(prompt, params))
    return [_check_generated(out) for out in outs]


def _choices_usage(outs: list[RequestOutput]) -> dict[str, Any]:
    """The prompt counted once, the completions of every choice summed."""
    return _usage(Usage(len(outs[0].prompt_token_ids), sum(len(o.token_ids) for o in outs),
                        outs[0].num_cached_tokens))


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _finish_reason(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason) if reason else None


def _check_generated(out: RequestOutput) -> RequestOutput:
    """A request the worker ended with an error (an image it could not encode, say) is a 400."""
    if out.finish_reason == "error":
        raise RequestError(out.error or "the request failed in the worker")
    return out


# ---- logprobs ---------------------------------------------------------------------------------

def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def _chat_logprobs(tokenizer: Any, token_ids: list[int],
                   logprobs: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []
    for token_id, lp in zip(token_ids, logprobs):
        text = _token_text(tokenizer, token_id)
        content.append({
            "token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, i)), "logprob": v,
                              "bytes": list(t.encode())}
                             for i, v in zip(lp.top_token_ids, lp.top_logprobs)],
        })
    return {"content": content}


def _completion_logprobs(tokenizer: Any, token_ids: list[int],
                         logprobs: list[TokenLogprobs] | None, offset: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token_text(tokenizer, i): v
                              for i, v in zip(lp.top_token_ids, lp.top_logprobs)}
                             for lp in logprobs],
            "text_offset": offsets}


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
    body: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
    model = check_model(request, body.model)
    check_messages(body.messages)
    fields = body.sampling_fields()
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if body.logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = body.top_logprobs or 0
    engine = _engine(request)
    prompt, params = await prepare(engine, body.messages, sampling_params(fields, engine.default_sampling_fields),
                                   max_tokens is not None, body.chat_template_kwargs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        deltas = await _started_choices(request, engine, prompt, params)
        return _sse(_chat_chunks(engine, deltas, request_id, created, model, include_usage,
                                 params.n))
    outs = await _generate_choices_or_abort(request, engine, prompt, params)
    return json_response({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": out.text},
                     "logprobs": _chat_logprobs(engine.tokenizer, out.token_ids, out.logprobs),
                     "finish_reason": _finish_reason(out.finish_reason)}
                    for i, out in enumerate(outs)],
        "usage": _choices_usage(outs)})


@handles_errors
async def completions(request: Request) -> Response:
    body: CompletionRequest = await read_json(request, CompletionRequest)
    model = check_model(request, body.model)
    if body.echo:
        raise RequestError("echo is not supported", param="echo")
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise RequestError("one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("prompt must be a string or a list of token ids", param="prompt")
        prompt = {"prompt_token_ids": prompt}
    fields = body.sampling_fields()
    fields["max_tokens"] = body.max_tokens if body.max_tokens is not None else 16
    if body.logprobs is not None:
        fields["logprobs"] = True
        fields["top_logprobs"] = body.logprobs
    engine = _engine(request)
    prompt, params = await prepare(engine, prompt, sampling_params(fields, engine.default_sampling_fields), True)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        deltas = await _started_choices(request, engine, prompt, params)
        return _sse(_completion_chunks(engine, deltas, request_id, created, model,
                                       include_usage))
    outs = await _generate_choices_or_abort(request, engine, prompt, params)
    return json_response({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": out.text,
                     "logprobs": _completion_logprobs(engine.tokenizer, out.token_ids,
                                                      out.logprobs, 0),
                     "finish_reason": _finish_reason(out.finish_reason)}
                    for i, out in enumerate(outs)],
        "usage": _choices_usage(outs)})


# ---- server-sent events -----------------------------------------------------------------------

def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    # The response task is cancelled when the client disconnects; the engine stream's cleanup
    # then aborts the request.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _event(body: Any) -> bytes:
    return b"data: " + _json.encode(body) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _guarded(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Errors after the response started become an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except EngineDeadError as exc:
        yield _event({"error": {"message": str(exc), "type": "engine_dead", "code": 503}})
    yield _DONE


def _stream_events(deltas: AsyncIterator[tuple[int, OutputDelta]], head: dict[str, Any],
                   include_usage: bool, first: list[dict[str, Any]],
                   choice: Callable[[int, OutputDelta], dict[str, Any]]) -> AsyncIterator[bytes]:
    """SSE events of one streamed request: the first choices given, one chunk per delta with
    content (its choice's index), and, when asked, a last chunk with usage (the prompt once,
    every choice's completion tokens) and no choices."""
    usage_field = {"usage": None} if include_usage else {}

    async def events() -> AsyncIterator[bytes]:
        for opening in first:
            yield _event({**head, "choices": [opening], **usage_field})
        usages: dict[int, Usage] = {}
        async for index, delta in deltas:
            if delta.usage is not None:
                usages[index] = delta.usage
            if delta.finish_reason == "error":
                yield _event({"error": {"message": delta.error or "the request failed in the worker",
                                        "type": "invalid_request_error", "code": 400}})
                return
            if delta.text or delta.finish_reason is not None or delta.logprobs:
                yield _event({**head, "choices": [choice(index, delta)], **usage_field})
        if include_usage and usages:
            any_usage = next(iter(usages.values()))
            total = Usage(any_usage.prompt_tokens,
                          sum(u.completion_tokens for u in usages.values()),
                          usages.get(0, any_usage).cached_tokens)
            yield _event({**head, "choices": [], "usage": _usage(total)})
    return _guarded(events())


def _chat_chunks(engine: AsyncEngine, deltas: AsyncIterator[tuple[int, OutputDelta]],
                 request_id: str, created: int, model: str, include_usage: bool,
                 n: int = 1) -> AsyncIterator[bytes]:
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None} for i in range(n)]

    def choice(index: int, delta: OutputDelta) -> dict[str, Any]:
        return {"index": index, "delta": {"content": delta.text} if delta.text else {},
                "logprobs": _chat_logprobs(engine.tokenizer, delta.token_ids, delta.logprobs),
                "finish_reason": _finish_reason(delta.finish_reason)}
    return _stream_events(deltas, head, include_usage, first, choice)


def _completion_chunks(engine: AsyncEngine, deltas: AsyncIterator[tuple[int, OutputDelta]],
                       request_id: str, created: int, model: str,
                       include_usage: bool) -> AsyncIterator[bytes]:
    head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    offsets: dict[int, int] = {}

    def choice(index: int, delta: OutputDelta) -> dict[str, Any]:
        offset = offsets.get(index, 0)
        logprobs = _completion_logprobs(engine.tokenizer, delta.token_ids, delta.logprobs,
                                        offset)
        offsets[index] = offset + len(delta.text)
        return {"index": index, "text": delta.text, "logprobs": logprobs,
                "finish_reason": _finish_reason(delta.finish_reason)}
    return _stream_events(deltas, head, include_usage, [], choice)
