"""Constrained decoding in the worker: one llguidance matcher per request with a grammar, walked
with the request's output tokens; its mask of allowed next tokens is applied to the request's logits
before sampling.

The grammar text comes compiled and checked by the engine core (AddRequest.grammar). The tokenizer
llguidance needs (the bytes of every token) is built from the checkpoint once, at the first request
with a grammar: a worker that never sees one loads nothing."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from streamvlm.contract.model_source import ModelSource


class RequestGrammar:
    """A request's matcher and how many of its output tokens the matcher has consumed.

    The matcher follows the sequence's tokens rather than the sampler's, so whatever appends them
    (a step, the first token from a prefill group) or replays them (recompute after preemption)
    keeps it right: ``sync`` consumes what it has not seen yet."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.num_consumed = 0
        self.ended_by_eos = False

    def sync(self, token_ids: list[int], num_prompt_tokens: int, eos_token_ids: frozenset[int]) -> None:
        """Consume the output tokens (token_ids past the prompt) the matcher has not seen."""
        num_output = len(token_ids) - num_prompt_tokens
        if self.num_consumed > num_output:
            self.matcher.reset()
            self.num_consumed, self.ended_by_eos = 0, False
        for token in token_ids[num_prompt_tokens + self.num_consumed:]:
            if token < 0:
                break   # a placeholder (async scheduling): its token is still being sampled
            self.num_consumed += 1
            if token in eos_token_ids and self.matcher.is_accepting():
                self.ended_by_eos = True
            elif not self.ended_by_eos:
                self.matcher.consume_token(token)

    def is_complete(self, token_ids: list[int], num_prompt_tokens: int, eos_token_ids: frozenset[int]) -> bool:
        """The output is a whole sentence of the grammar and nothing more may follow (or an
        end-of-sequence token ended it): the request stops."""
        self.sync(token_ids, num_prompt_tokens, eos_token_ids)
        return self.ended_by_eos or self.matcher.is_stopped() or self.matcher.is_error()

    def fill_mask(self, token_ids: list[int], num_prompt_tokens: int, eos_token_ids: frozenset[int],
                  row: np.ndarray) -> None:
        """Bits of the tokens allowed next (bit t % 32 of word t // 32) into ``row`` (int32)."""
        self.sync(token_ids, num_prompt_tokens, eos_token_ids)
        row[:] = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)[:len(row)]
        if self.matcher.is_accepting() or self.matcher.is_error():
            # The request's own end-of-sequence tokens end a complete output too (llguidance knows
            # only the tokenizer's); a matcher in error lets the request end rather than go on.
            for token in eos_token_ids:
                if token < 32 * len(row):
                    row[token // 32] |= np.int32(np.uint32(1 << (token % 32)).view(np.int32))


class GrammarMatchers:
    """Makes RequestGrammars; owns the llguidance tokenizer of this worker's checkpoint."""

    def __init__(self, source: ModelSource, tokenizer_path: str | None, vocab_size: int) -> None:
        self.source = source
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._load_hf_tokenizer(), n_vocab=self.vocab_size)
        return self._tokenizer

    def _load_hf_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self.tokenizer_path:
            return AutoTokenizer.from_pretrained(self.tokenizer_path)
        if self.source.kind == "hf":
            return AutoTokenizer.from_pretrained(self.source.path)
        return AutoTokenizer.from_pretrained(self.source.folder, gguf_file=os.path.basename(self.source.path))

    def build(self, grammar: str) -> RequestGrammar:
        """ValueError names why the grammar cannot be matched with this tokenizer."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer(), grammar)
        if matcher.is_error():
            raise ValueError(f"structured output grammar rejected: {matcher.get_error()}")
        return RequestGrammar(matcher)
