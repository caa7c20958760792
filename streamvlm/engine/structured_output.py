"""Structured output in the engine core: a request's StructuredOutputs compiled into the grammar
text that its worker builds a matcher from (llguidance), refused here when it does not compile.

llguidance compiles lazily (the token-level automaton is built as the worker walks it), so the
worker's cost per request is small; what is done here is checking the grammar whole and once:
results are cached by schema text."""

from __future__ import annotations

import json
from functools import lru_cache

from streamvlm.contract.sampling import StructuredOutputs

GRAMMAR_CACHE_SIZE = 256
# Compact JSON: a model (a random one above all) cannot wander through unbounded whitespace.
_JSON_DEFAULTS = {"whitespace_flexible": False}


def compile_structured_outputs(spec: StructuredOutputs) -> str:
    """The llguidance grammar (JSON text) of ``spec``; ValueError names what does not compile."""
    return _compile(*spec.cache_key())


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _compile(kind: str, value: str) -> str:
    from llguidance import LLMatcher

    try:
        if kind == "json":
            schema = json.loads(value)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        elif kind == "json_object":
            grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            choices = json.loads(value)
            grammar = LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        elif kind == "grammar":
            grammar = LLMatcher.grammar_from_lark(value)
        else:
            raise ValueError(f"unknown structured output kind {kind!r}")
    except ValueError as exc:
        raise ValueError(f"structured_outputs.{kind} does not compile: {exc}") from None
    except Exception as exc:   # the library's own errors (RuntimeError, ...)
        raise ValueError(f"structured_outputs.{kind} does not compile: {exc}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"structured_outputs.{kind} does not compile: {error.strip()}")
    return grammar
