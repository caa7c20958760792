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

    def allow_eos(self, eos_token_ids: frozenset[int], row: np.ndarray) -> None:
        """The request's own end-of-sequence tokens end a complete output too (llguidance knows
        only the tokenizer's); a matcher in error lets the request end rather than go on."""
        if self.matcher.is_accepting() or self.matcher.is_error():
            for token in eos_token_ids:
                if token < 32 * len(row):
                    row[token // 32] |= np.int32(np.uint32(1 << (token % 32)).view(np.int32))


class MaskBatch:
    """The masks of one step's grammar rows, computed together: llguidance's executor fills the
    rows of one int32 array on its own threads (without the GIL), and the packed words (1/8 of a
    byte per token) go to the device, where the bits are expanded. The array is kept from step to
    step (pinned on CUDA); a step waits for the copy out of it before the next one refills it."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self._executor: Any = None
        self._words: Any = None          # torch int32 [rows, words], pinned on CUDA
        self._copied: Any = None         # CUDA event after the last copy out of _words
        self._bit_index: Any = None      # (word of each token, its bit), on the device

    def allowed(self, grammars: list[tuple[RequestGrammar, list[int], int, frozenset[int]]],
                vocab: int) -> Any:
        """Bool [len(grammars), vocab] on the device: the tokens each grammar allows next. Each
        entry: (grammar, the sequence's token ids, its prompt length, its end-of-sequence ids)."""
        import torch
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = LLExecutor()
        num_words = (vocab + 31) // 32
        words = self._buffer(len(grammars), num_words)
        array = words.numpy()
        for grammar, token_ids, num_prompt_tokens, eos in grammars:
            grammar.sync(token_ids, num_prompt_tokens, eos)
        fill_next_token_bitmask_par(self._executor, [(g.matcher, j) for j, (g, *_) in enumerate(grammars)], array)
        for j, (grammar, _, _, eos) in enumerate(grammars):
            grammar.allow_eos(eos, array[j])
        if self.device.type == "cuda":
            on_device = words.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            on_device = words   # expanded below, before the array is used again
        word_of, bit_of = self._bits(vocab)
        return ((on_device[:, word_of] >> bit_of) & 1).bool()

    def _buffer(self, rows: int, num_words: int) -> Any:
        import torch

        if self._copied is not None:
            self._copied.synchronize()
        if self._words is None or self._words.shape[0] < rows or self._words.shape[1] != num_words:
            self._words = torch.zeros((max(rows, 64), num_words), dtype=torch.int32,
                                      pin_memory=self.device.type == "cuda")
        return self._words[:rows]

    def _bits(self, vocab: int) -> tuple[Any, Any]:
        import torch

        if self._bit_index is None or self._bit_index[0].shape[0] != vocab:
            tokens = torch.arange(vocab, device=self.device)
            self._bit_index = (tokens // 32, (tokens % 32).to(torch.int32))
        return self._bit_index


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
