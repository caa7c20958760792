"""vLLM's tokenizer endpoints: /tokenize, /detokenize, and /v1/apply_template (the templated
prompt of a conversation, without generating). Errors use OpenAI's error JSON shape."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.gateway.common import RequestError, check_messages
from streamvlm.gateway.http import check_model, handles_errors, json_response, read_json
from streamvlm.gateway.openai_schemas import (ApplyTemplateRequest, DetokenizeRequest,
                                              TokenizeRequest)


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _tokenizer(engine: AsyncEngine) -> Any:
    if engine.tokenizer is None:
        raise RequestError("this server has no tokenizer (skip_tokenizer_init is set)")
    return engine.tokenizer


async def _messages_ids(engine: AsyncEngine, messages: list[dict[str, Any]],
                        chat_template_kwargs: dict[str, Any] | None) -> list[int]:
    """The token ids a chat request with these messages would be given, images expanded."""
    check_messages(messages)
    try:
        return (await engine.prepare_prompt(messages, chat_template_kwargs)).prompt_token_ids
    except ValueError as exc:
        raise RequestError(str(exc), param="messages") from exc


async def _prompt_ids(engine: AsyncEngine, prompt: str, add_special_tokens: bool) -> list[int]:
    tokenizer = _tokenizer(engine)
    if len(prompt) > engine.processor.max_prompt_bytes:
        raise RequestError(f"prompt is over {engine.processor.max_prompt_bytes} characters "
                           f"(max_prompt_bytes)", param="prompt")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, lambda: tokenizer.encode(prompt, add_special_tokens=add_special_tokens))


@handles_errors
async def tokenize(request: Request) -> Response:
    body: TokenizeRequest = await read_json(request, TokenizeRequest)
    check_model(request, body.model)
    engine = _engine(request)
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("give exactly one of 'prompt' and 'messages'")
    if body.prompt is not None:
        if body.chat_template_kwargs:
            raise RequestError("chat_template_kwargs apply to messages only",
                               param="chat_template_kwargs")
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await _prompt_ids(engine, body.prompt, add_special)
    else:
        if body.add_special_tokens:
            # The chat template writes the special tokens a conversation needs.
            raise RequestError("add_special_tokens applies to a prompt only",
                               param="add_special_tokens")
        ids = await _messages_ids(engine, body.messages, body.chat_template_kwargs)
    return json_response({"tokens": ids, "count": len(ids),
                          "max_model_len": engine.processor.max_model_len})


@handles_errors
async def detokenize(request: Request) -> Response:
    body: DetokenizeRequest = await read_json(request, DetokenizeRequest)
    check_model(request, body.model)
    engine = _engine(request)
    tokenizer = _tokenizer(engine)
    limit = engine.processor.max_model_len
    if len(body.tokens) > limit:
        raise RequestError(f"{len(body.tokens)} tokens is more than max_model_len={limit}",
                           param="tokens")
    known = len(tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < known), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is not in the tokenizer's vocabulary [0, {known})",
                           param="tokens")
    return json_response({"prompt": tokenizer.decode(body.tokens)})


@handles_errors
async def apply_template(request: Request) -> Response:
    body: ApplyTemplateRequest = await read_json(request, ApplyTemplateRequest)
    check_model(request, body.model)
    engine = _engine(request)
    ids = await _messages_ids(engine, body.messages, body.chat_template_kwargs)
    loop = asyncio.get_running_loop()
    try:
        text = await loop.run_in_executor(None, engine.processor.chat_text, body.messages,
                                          body.chat_template_kwargs)
    except ValueError as exc:
        raise RequestError(str(exc), param="messages") from exc
    return json_response({"prompt": text, "token_ids": ids, "count": len(ids),
                          "max_model_len": engine.processor.max_model_len})
