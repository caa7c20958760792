"""OpenAI request bodies as msgspec Structs: decoding validates types and required fields.

A field the server does not know is refused (400 naming it in ``param``), so that a request
for something not implemented (``functions``, ``best_of``, ...)
is not answered as if it had been honoured. The few fields below typed ``Any`` are metadata
that changes nothing about the answer (``user``, ``metadata``, ``store``...): accepted and
ignored. ``GatewaySettings.ignore_unknown_fields`` decodes with the ``Lenient*`` variants, which
ignore every unknown field. Fields accepted beyond OpenAI's (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, bad_words, prompt_logprobs, chat_template_kwargs,
structured_outputs, guided_json, guided_regex, guided_choice, guided_grammar) follow vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from streamvlm.inputs.chat import TemplateValue

Role = Literal["system", "developer", "user", "assistant", "tool"]


class MessageRole(msgspec.Struct):
    """What the gateway checks of each chat message before the chat template sees it (the rest
    of the message passes through as a dict)."""

    role: Role


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk carries the usage so far too.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    """OpenAI's ``response_format``: "text" (unconstrained), "json_object" or "json_schema"."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# OpenAI's rule for function names, with dots (used by some clients for namespaces).
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None    # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One of ``tools``: a function the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    """``tool_choice`` naming the one function the model must call."""

    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


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
    prompt_logprobs: int | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and guided_* names.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted and ignored: they describe the request and change nothing about the answer.
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None

    def sampling_fields(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens",
                 "stop_token_ids", "prompt_logprobs")
        fields = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.stop is not None:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.n != 1:
            fields["n"] = self.n
        if self.logit_bias:
            fields["logit_bias"] = _token_id_keys(self.logit_bias)
        if self.bad_words:
            fields["bad_words"] = self.bad_words
        structured = self.structured_output_fields()
        if structured is not None:
            fields["structured_outputs"] = structured
        return fields

    def structured_output_fields(self) -> dict[str, Any] | None:
        """The request's constraint as StructuredOutputs fields, from whichever name it used
        (ValueError when it used several: StructuredOutputs takes exactly one constraint)."""
        given = [("structured_outputs", "", self.structured_outputs)] if self.structured_outputs else []
        given += [(f"guided_{key}", key, value)
                  for key, value in (("json", self.guided_json), ("regex", self.guided_regex),
                                     ("choice", self.guided_choice), ("grammar", self.guided_grammar))
                  if value is not None]
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", "json_object", True))
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema if fmt.json_schema is not None else None
            # OpenAI's default schema (none given): any JSON value.
            given.append(("response_format", "json", {} if schema is None else schema))
        if len(given) > 1:
            raise ValueError("give one structured output constraint, not "
                             + " and ".join(name for name, _, _ in given))
        if not given:
            return None
        _, key, value = given[0]
        return value if not key else {key: value}


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
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]    # a string, token ids, or a list of either
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
