"""OpenAI request bodies as msgspec Structs: decoding validates types and required fields.

Unknown fields are ignored, as OpenAI-compatible servers commonly do; fields we accept beyond
OpenAI's (top_k, min_p, repetition_penalty, ignore_eos, min_tokens) follow vLLM.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Role = Literal["system", "developer", "user", "assistant", "tool"]


class MessageRole(msgspec.Struct):
    """What the gateway checks of each chat message before the chat template sees it (the rest
    of the message passes through as a dict)."""

    role: Role


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None

    def sampling_fields(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens",
                 "stop_token_ids")
        fields = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.stop is not None:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return fields


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]    # a string, token ids, or a one-element list of either
    logprobs: int | None = None
    echo: bool = False
