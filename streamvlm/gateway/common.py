"""What the HTTP and WebSocket front ends share: turning a request into engine input."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.request_state import OutputDelta
from streamvlm.gateway.openai_schemas import MessageRole
from streamvlm.inputs.processor import PreparedPrompt
from streamvlm.contract.sampling import SamplingParams


class RequestError(Exception):
    """A client mistake: becomes a 4xx JSON error over HTTP, an error event over WebSocket."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


_message_roles = list[MessageRole]


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Every message has a known role (a string, not a number, null or object)."""
    try:
        msgspec.convert(messages, _message_roles)
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid messages: {exc}", param="messages") from exc


def sampling_params(fields: dict[str, Any], defaults: Mapping[str, Any] | None = None
                    ) -> SamplingParams:
    """SamplingParams from the fields a request set, over ``defaults`` (the engine's
    ``default_sampling_fields``, from the checkpoint's generation config) for those it did not;
    unknown fields and bad values are 400s."""
    try:
        return msgspec.convert({**(defaults or {}), **fields}, SamplingParams)
    except (msgspec.ValidationError, ValueError) as exc:
        raise RequestError(f"invalid sampling parameters: {exc}") from exc


async def prepare(engine: AsyncEngine, prompt: Any, params: SamplingParams,
                  max_tokens_given: bool, chat_template_kwargs: dict[str, Any] | None = None,
                  tools: list[dict[str, Any]] | None = None
                  ) -> tuple[PreparedPrompt, SamplingParams]:
    """Tokenize (off the event loop) and fit max_tokens to the context.

    Without an explicit max_tokens a request may use the whole context, or the default
    max_tokens (the generation config's max_new_tokens) where that is less; an explicit one that
    does not fit is refused, as the OpenAI API does.
    """
    try:
        engine.processor.validate_params(params)
        prepared = await engine.prepare_prompt(prompt, chat_template_kwargs, tools)
        prompt_ids = prepared.prompt_token_ids
        engine.processor.validate(prompt_ids, params)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    max_model_len = engine.processor.max_model_len
    room = max_model_len - len(prompt_ids)
    if not max_tokens_given:
        limit = min(room, engine.default_sampling_fields.get("max_tokens", room))
        params = msgspec.structs.replace(params, max_tokens=limit,
                                         min_tokens=min(params.min_tokens, limit))
    elif params.max_tokens > room:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} more",
            param="max_tokens")
    return prepared, params


async def _indexed(deltas: AsyncIterator[OutputDelta]) -> AsyncIterator[tuple[int, OutputDelta]]:
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            yield 0, delta


def choice_stream(engine: AsyncEngine, prompt: Any, params: SamplingParams, request_id: str | None = None,
                  coalesce_s: float = 0.0) -> AsyncIterator[tuple[int, OutputDelta]]:
    """Indexed deltas of every choice of one prompt (engine.stream_choices); n == 1 is the
    plain stream with index 0. ``coalesce_s``: see engine.stream."""
    if params.n == 1:
        return _indexed(engine.stream(prompt, params, request_id, coalesce_s=coalesce_s))
    return engine.stream_choices(prompt, params, request_id, coalesce_s=coalesce_s)


def choice_request_ids(request_id: str, n: int) -> list[str]:
    """The engine request ids of a call's choices (as engine.stream_choices names them)."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
