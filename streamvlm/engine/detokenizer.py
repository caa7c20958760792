"""Incremental detokenization of one request's output, with stop strings.

Two ways to turn ids into text as they come, both exactly ``tokenizer.decode(output_ids)``:

- byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2, ...) are decoded without the
  tokenizer: each id is a fixed byte string and an incremental UTF-8 decoder keeps the bytes of an
  incomplete character (``streamvlm.engine.byte_level``);
- any other tokenizer is decoded in a short sliding window, as vLLM and HF TGI do: the window holds
  a few already-emitted "prefix" ids as context, and the new text is ``decode(window)`` minus
  ``decode(prefix)``. While the window's text ends with U+FFFD the last character may still be
  incomplete (byte-level BPE splits UTF-8 characters across tokens), so the text is held back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from streamvlm.engine.byte_level import ByteLevelStream, ByteLevelVocab
from streamvlm.engine.stop_strings import StopStringMatcher

_REPLACEMENT_CHAR = "\ufffd"
# Held-back ids beyond which the window is checked for a cut that later ids cannot change; only
# text that ends in a real U+FFFD or invalid bytes stays held that long, and the window must not
# grow with it.
_MAX_PENDING_IDS = 8


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def fast_decode_fn(tokenizer: TokenDecoder) -> Callable[[list[int], bool], str]:
    """``tokenizer.decode``, calling the Rust tokenizer directly where that gives the same text.

    The Python wrapper costs several times the decode itself, and the window decoder decodes a
    short window for every token of every stream.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class WindowDecoder:
    """Ids to text through ``tokenizer.decode`` over a short window (see the module docstring)."""

    def __init__(self, tokenizer: TokenDecoder, skip_special_tokens: bool) -> None:
        self._decode_ids = fast_decode_fn(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self.window: list[int] = []
        self._prefix_len = 0  # window[:prefix_len] is emitted context, and ends on a clean cut
        self._prefix_text = ""

    def add(self, token_ids: Sequence[int]) -> str:
        return "".join([self._step(token_id) for token_id in token_ids])

    def finish(self) -> str:
        """An incomplete character at the very end, emitted as decode() renders it."""
        return self._decode(self.window)[len(self._prefix_text):]

    def _decode(self, token_ids: list[int]) -> str:
        return self._decode_ids(token_ids, self._skip_special_tokens)

    def _step(self, token_id: int) -> str:
        """Decodes the window with ``token_id`` added; returns newly complete text."""
        window = self.window
        window.append(token_id)
        text = self._decode(window)
        if text == self._prefix_text:
            # The pending ids render as nothing (skipped special tokens); drop them.
            del window[self._prefix_len:]
            return ""
        if not text.endswith(_REPLACEMENT_CHAR):
            return self._advance(len(window), text)
        if len(window) - self._prefix_len > _MAX_PENDING_IDS:
            # A cut before the last id is final when decoding both sides apart changes nothing:
            # were the text before it an incomplete character that the last id's bytes continue,
            # the two halves would render extra U+FFFDs.
            head, tail = self._decode(window[:-1]), self._decode(window[-1:])
            if tail and head + tail == text and len(head) > len(self._prefix_text):
                return self._advance(len(window) - 1, head)
        return ""

    def _advance(self, cut: int, text: str) -> str:
        """Emits ``text`` (the decoding of window[:cut]) past the prefix; window[:cut] becomes
        the new prefix, less the old prefix, so the window stays short."""
        new_text = text[len(self._prefix_text):]
        del self.window[:self._prefix_len]
        self._prefix_len = cut - self._prefix_len
        self._prefix_text = self._decode(self.window[:self._prefix_len])
        return new_text


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text, stopping at the first stop string.

    With no stop string hit, the concatenation of everything ``add_tokens`` and ``finish``
    return equals ``tokenizer.decode(output_ids, skip_special_tokens=...)``, however the ids are
    split into calls. ``prompt_token_ids`` are accepted but not used as decoding context: that
    context would make the first output token decode differently from ``decode(output_ids)``
    (SentencePiece's leading space, or bytes of a character that the prompt left incomplete), and
    byte-level BPE needs none.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int],
                 stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 min_tokens: int = 0) -> None:
        del prompt_token_ids
        # Stop strings count only from the min_tokens-th output token on (as EOS does).
        self._min_tokens = min_tokens
        vocab = ByteLevelVocab.of(tokenizer)
        self._ids: ByteLevelStream | WindowDecoder = (
            ByteLevelStream(vocab, skip_special_tokens) if vocab is not None
            else WindowDecoder(tokenizer, skip_special_tokens))
        self._stop = StopStringMatcher(stop)
        self._parts: list[str] = []
        self._num_tokens = 0
        self._finished = False
        self._stop_string_hit: str | None = None
        self._num_tokens_at_stop: int | None = None

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def stop_string_hit(self) -> str | None:
        return self._stop_string_hit

    @property
    def num_tokens_at_stop(self) -> int | None:
        return self._num_tokens_at_stop

    @property
    def decodes_without_tokenizer(self) -> bool:
        """Byte-level BPE: ids become text through a byte table, not tokenizer.decode."""
        return isinstance(self._ids, ByteLevelStream)

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Adds output ids; returns the new text that is safe to emit now ("" if none)."""
        if self._stop_string_hit is not None or self._finished or not token_ids:
            return ""
        if not self._stop.stops:
            self._num_tokens += len(token_ids)
            text = self._ids.add(token_ids)
            if text:
                self._parts.append(text)
            return text
        out: list[str] = []
        for token_id in token_ids:
            if self._stop_string_hit is not None:
                break
            # One id at a time, so that num_tokens_at_stop is exact.
            self._num_tokens += 1
            out.append(self._release(self._ids.add((token_id,))))
        return "".join(out)

    def finish(self) -> str:
        """Returns the text still held back; call once, when the request ends."""
        if self._stop_string_hit is not None or self._finished:
            return ""
        self._finished = True
        out = self._release(self._ids.finish())
        if self._stop_string_hit is None:
            held = self._stop.flush()
            if held:
                out += held
                self._parts.append(held)
        return out

    def _release(self, new_text: str) -> str:
        """Applies stop strings to ``new_text``; returns the part that can be emitted."""
        if not new_text:
            return ""
        if not self._stop.stops or self._num_tokens < self._min_tokens:
            out = self._stop.flush() + new_text
            self._parts.append(out)
            return out
        out, hit = self._stop.feed(new_text)
        if hit is not None:
            self._stop_string_hit = hit
            self._num_tokens_at_stop = self._num_tokens
        if out:
            self._parts.append(out)
        return out
