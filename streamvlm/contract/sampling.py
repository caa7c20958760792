"""Sampling parameters of one request, validated on construction."""

from __future__ import annotations

import json as _json
from typing import Any

import msgspec

MAX_TOP_LOGPROBS = 20
# Structured output: a schema, regex or grammar longer than this (in characters, a JSON schema
# as compact JSON) is refused; so is a choice among more than MAX_CHOICES strings.
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 1024
# Integers cross to the workers as msgpack, which carries at most 64 bits; token ids are int32
# (vocabularies are far smaller). Larger values are refused here, before a request is queued.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
UINT64_MAX = 2**64 - 1
TOKEN_ID_MAX = 2**31 - 1
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_BAD_WORDS = 100
MAX_BAD_WORD_TOKENS = 32
MAX_N = 16


class StructuredOutputs(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Output constrained to one of: a JSON schema (``json``: a dict or its JSON text), any JSON
    object (``json_object``), a regular expression (``regex``), one of a list of strings
    (``choice``), or a Lark/EBNF grammar (``grammar``, llguidance's Lark dialect). Exactly one is set.

    The engine core compiles it into a grammar (and refuses one that does not compile); the worker
    masks the logits of the request's rows with it, so every output is in the language."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        _check(len(kinds) == 1, "structured_outputs needs exactly one of json, json_object, regex, "
                                f"choice, grammar; got {kinds or 'none'}")
        if isinstance(self.json, dict):
            try:
                text = _json.dumps(self.json, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"structured_outputs.json is not JSON: {exc}") from None
        else:
            text = self.json or self.regex or self.grammar or ""
        _check(isinstance(text, str) and len(text) <= MAX_GRAMMAR_CHARS,
               f"structured_outputs.{kinds[0]} is longer than {MAX_GRAMMAR_CHARS} characters")
        if self.choice is not None:
            _check(0 < len(self.choice) <= MAX_CHOICES
                   and all(isinstance(c, str) and c for c in self.choice)
                   and sum(map(len, self.choice)) <= MAX_GRAMMAR_CHARS,
                   f"structured_outputs.choice must be 1 to {MAX_CHOICES} non-empty strings of at "
                   f"most {MAX_GRAMMAR_CHARS} characters in all")

    @property
    def kind(self) -> str:
        for name in ("json", "json_object", "regex", "choice", "grammar"):
            if getattr(self, name) not in (None, False):
                return name
        raise AssertionError("validated on construction")

    def cache_key(self) -> tuple[str, str]:
        """What the compiled grammar depends on, as hashable text."""
        kind = self.kind
        if kind == "json":
            value = self.json if isinstance(self.json, str) else _json.dumps(self.json, sort_keys=True)
        elif kind == "choice":
            value = _json.dumps(self.choice)
        elif kind == "json_object":
            value = ""
        else:
            value = getattr(self, kind)
        return kind, value


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to pick tokens and when to stop, for one request.

    ``temperature == 0`` means greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``stop`` strings end the output and are never included in ``text``; ``stop_token_ids`` end it
    and stay in ``token_ids``. ``logprobs`` asks for the log-probability of each sampled token
    (a log-softmax of the raw model logits); ``top_logprobs`` adds the N most likely alternatives.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = []
    stop_token_ids: list[int] = []
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] = {}
    # Strings never generated: the engine core tokenizes them into bad_words_token_ids, whose
    # last token is banned whenever the output ends with the tokens before it.
    bad_words: list[str] = []
    bad_words_token_ids: list[list[int]] = []
    # Logprobs of the prompt's tokens (each given the tokens before it) with this many top
    # alternatives (0: the prompt token's own only); None: not computed. A request asking for them
    # computes its whole prompt (no prefix from the prefix cache), so the values are exact.
    prompt_logprobs: int | None = None
    # Independent samples of the same prompt (seeds seed, seed + 1, ... when seeded).
    n: int = 1
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = msgspec.convert(self.structured_outputs, StructuredOutputs)
            except msgspec.ValidationError as exc:
                raise ValueError(f"structured_outputs: {exc}") from None
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs must be a StructuredOutputs or a dict of its fields")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= INT64_MAX,
               f"max_tokens must be an integer in [1, 2**63), got {self.max_tokens!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and INT64_MIN <= self.top_k <= INT64_MAX,
               f"top_k must be an integer in [-2**63, 2**63), got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _check(_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _check(_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        # The sampler mixes any integer seed down to 63 bits; the wire takes int64 and uint64.
        _check(self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= UINT64_MAX),
               f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a list of non-empty strings")
        _check(all(_is_int(t) and 0 <= t <= TOKEN_ID_MAX for t in self.stop_token_ids),
               "stop_token_ids must be a list of integers in [0, 2**31)")
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs:
            self.logprobs = True
        _check(self.prompt_logprobs is None
               or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
               f"prompt_logprobs must be None or in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs!r}")
        _check(isinstance(self.logit_bias, dict)
               and len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES
               and all(_is_int(t) and 0 <= t <= TOKEN_ID_MAX and _is_number(b) and -100 <= b <= 100
                       for t, b in self.logit_bias.items()),
               f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids in [0, 2**31) "
               f"to biases in [-100, 100]")
        _check(len(self.bad_words) <= MAX_BAD_WORDS
               and all(isinstance(w, str) and w for w in self.bad_words),
               f"bad_words must be a list of at most {MAX_BAD_WORDS} non-empty strings")
        _check(len(self.bad_words_token_ids) <= 2 * MAX_BAD_WORDS
               and all(0 < len(ids) <= MAX_BAD_WORD_TOKENS
                       and all(_is_int(t) and 0 <= t <= TOKEN_ID_MAX for t in ids)
                       for ids in self.bad_words_token_ids),
               f"bad_words_token_ids must be at most {2 * MAX_BAD_WORDS} lists of 1 to "
               f"{MAX_BAD_WORD_TOKENS} token ids")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N,
               f"n must be an integer in [1, {MAX_N}], got {self.n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reads_history(self) -> bool:
        """Sampling looks at the tokens generated so far (the penalties, bad words, a grammar's mask),
        so it needs them on the host."""
        return (self.repetition_penalty != 1.0 or bool(self.presence_penalty)
                or bool(self.frequency_penalty) or bool(self.bad_words_token_ids)
                or self.structured_outputs is not None)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
