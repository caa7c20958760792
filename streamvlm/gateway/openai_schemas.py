"""OpenAI request bodies as msgspec Structs: decoding validates types and required fields.

A field the server does not know is refused (400 naming it in ``param``), so that a request
for something not implemented (``tools``, ``response_format``, ``best_of``, ...)
is not answered as if it had been honoured. The few fields below typed ``Any`` are metadata
that changes nothing about the answer (``user``, ``metadata``, ``store``...): accepted and
ignored. ``GatewaySettings.ignore_unknown_fields`` decodes with the ``Lenient*`` variants, which
ignore every unknown field. Fields accepted beyond OpenAI's (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, bad_words, chat_template_kwargs) follow vLLM.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from streamvlm.inputs.chat import TemplateValue

Role = Literal["system", "developer", "user", "assistant", "tool"]


class MessageRole(msgspec.Struct):
    """What the gateway checks of each chat message before the chat template sees it (the rest
    of the message passes through as a dict)."""

    role: Role


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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
    logit_bias: dict[str, float] | None = None   # token ids as strings, as OpenAI sends them
    bad_words: list[str] | None = None
    # Accepted and ignored: they describe the request and change nothing about the answer.
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None

    def sampling_fields(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens",
                 "stop_token_ids")
        fields = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.stop is not None:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.n != 1:
            fields["n"] = self.n
        if self.logit_bias:
            fields["logit_bias"] = _token_id_keys(self.logit_bias)
        if self.bad_words:
            fields["bad_words"] = self.bad_words
        return fields


def _token_id_keys(bias: dict[str, float]) -> dict[Any, float]:
    """OpenAI's logit_bias keys are token ids written as strings; a key that is not one stays a
    string, which SamplingParams refuses."""
    return {int(k) if k.isascii() and k.isdigit() else k: v for k, v in bias.items()}


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, TemplateValue] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]    # a string, token ids, or a one-element list of either
    logprobs: int | None = None
    echo: bool = False


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /tokenize: a prompt, or chat messages (templated, images expanded)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None    # default: True for a prompt, False for messages
    chat_template_kwargs: dict[str, TemplateValue] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


class ApplyTemplateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    messages: list[dict[str, Any]]
    chat_template_kwargs: dict[str, TemplateValue] | None = None


class LenientChatCompletionRequest(ChatCompletionRequest, forbid_unknown_fields=False):
    pass


class LenientCompletionRequest(CompletionRequest, forbid_unknown_fields=False):
    pass


class LenientTokenizeRequest(TokenizeRequest, forbid_unknown_fields=False):
    pass


class LenientDetokenizeRequest(DetokenizeRequest, forbid_unknown_fields=False):
    pass


class LenientApplyTemplateRequest(ApplyTemplateRequest, forbid_unknown_fields=False):
    pass


LENIENT: dict[type, type] = {
    ChatCompletionRequest: LenientChatCompletionRequest,
    CompletionRequest: LenientCompletionRequest,
    TokenizeRequest: LenientTokenizeRequest,
    DetokenizeRequest: LenientDetokenizeRequest,
    ApplyTemplateRequest: LenientApplyTemplateRequest,
}
