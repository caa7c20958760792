"""The engine core's view of one request: accumulates worker deltas into text and tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from streamvlm.engine.detokenizer import IncrementalDetokenizer
from streamvlm.engine.request_timing import RequestTimings
from streamvlm.outputs import RequestOutput
from streamvlm.contract.protocol import PromptLogprobs, RequestDelta, TokenLogprobs
from streamvlm.contract.sampling import SamplingParams


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class OutputDelta:
    """What a request gained since the previous delta. The last one has ``finish_reason`` set
    and carries ``usage``."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None
    # On the first token's delta of a request made with collect_timings=True.
    timings: RequestTimings | None = None
    # On the first token's delta of a request with params.prompt_logprobs.
    prompt_logprobs: PromptLogprobs | None = None

    def merge(self, later: OutputDelta) -> None:
        """Absorb a later delta of the same request (for a consumer that fell behind)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        self.finish_reason = later.finish_reason
        self.error = later.error
        self.usage = later.usage
        self.timings = self.timings or later.timings
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs


class RequestState:
    """One request's output so far. Its text is kept by the detokenizer and written to
    ``output.text`` when the request ends: appending each delta to one string would copy the
    whole text for every token."""

    __slots__ = ("params", "output", "detokenizer", "_held")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Any) -> None:
        self.params = params
        self.output = RequestOutput(request_id, prompt_token_ids,
                                    logprobs=[] if params.logprobs else None)
        self.detokenizer = (IncrementalDetokenizer(tokenizer, prompt_token_ids, params.stop,
                                                   params.skip_special_tokens,
                                                   params.min_tokens)
                            if tokenizer is not None else None)
        # Positioned deltas that arrived ahead of their turn, by output_index.
        self._held: dict[int, RequestDelta] = {}

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    @property
    def stopped_by_string(self) -> bool:
        return self.detokenizer is not None and self.detokenizer.stop_string_hit is not None

    def apply(self, delta: RequestDelta) -> OutputDelta | None:
        """Fold in a worker delta, in output order: a positioned delta ahead of its turn is held
        until the tokens before it arrive, and tokens already folded in are dropped. None if
        nothing is new yet (held, a duplicate) or the request already ended (a late abort echo).
        A delta without tokens (an abort or error) ends the request as it comes."""
        output = self.output
        if output.finish_reason is not None:
            return None
        index = delta.output_index
        if index < 0 or not delta.new_token_ids:
            return self._fold(delta)
        expected = len(output.token_ids)
        if index == expected and not self._held:
            return self._fold(delta)
        if index > expected:
            self._held[index] = delta
            return None
        if index < expected:
            delta = self._without_first(delta, expected - index)
            if delta is None:
                return None
        out = self._fold(delta)
        while output.finish_reason is None:
            later = self._held.pop(len(output.token_ids), None)
            if later is None:
                break
            out.merge(self._fold(later))
        if output.finish_reason is not None:
            self._held.clear()
        return out

    @staticmethod
    def _without_first(delta: RequestDelta, num_tokens: int) -> RequestDelta | None:
        """delta less its first num_tokens tokens (already folded in); None if nothing is left."""
        if num_tokens >= len(delta.new_token_ids):
            return None
        logprobs = delta.logprobs[num_tokens:] if delta.logprobs is not None else None
        return msgspec.structs.replace(delta, new_token_ids=delta.new_token_ids[num_tokens:],
                                       logprobs=logprobs,
                                       output_index=delta.output_index + num_tokens)

    def _fold(self, delta: RequestDelta) -> OutputDelta:
        out = self.output
        token_ids = delta.new_token_ids
        finish_reason = delta.finish_reason
        detok = self.detokenizer
        text = ""
        if detok is not None:
            if token_ids:
                text = detok.add_tokens(token_ids)
            if detok.stop_string_hit is not None:
                # Keep tokens up to the one that completed the stop string.
                token_ids = token_ids[:detok.num_tokens_at_stop - len(out.token_ids)]
                finish_reason = "stop"
            elif finish_reason is not None:
                text += detok.finish()
        logprobs = None
        if out.logprobs is not None and delta.logprobs is not None:
            logprobs = delta.logprobs[:len(token_ids)]
            out.logprobs.extend(logprobs)
        out.token_ids += token_ids
        if delta.num_cached_tokens > out.num_cached_tokens:
            out.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
        if finish_reason is None:
            return OutputDelta(out.request_id, text, token_ids, logprobs, None, delta.error,
                               prompt_logprobs=delta.prompt_logprobs)
        out.text = detok.text if detok is not None else ""
        out.finish_reason = finish_reason
        out.error = delta.error
        usage = Usage(len(out.prompt_token_ids), len(out.token_ids), out.num_cached_tokens)
        return OutputDelta(out.request_id, text, token_ids, logprobs, finish_reason, delta.error,
                           usage, prompt_logprobs=delta.prompt_logprobs)
