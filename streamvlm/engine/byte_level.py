"""Decoding byte-level BPE output without the tokenizer: every token id is a fixed byte string.

A tokenizer whose decoder is ``ByteLevel`` (GPT-2, Llama 3, Qwen, SmolLM2, ...) turns ids into
text by concatenating each token's bytes and decoding the result as UTF-8, invalid bytes
replaced. Added tokens (specials such as ``<|im_end|>``) are not bytes: the tokenizer decodes the
bytes before one on their own, then appends its content (or nothing, for a special token when
skipping them). ``ByteLevelVocab.of`` checks that a tokenizer decodes this way before it is used
for one, so a stream decoded here is exactly ``tokenizer.decode(ids, skip_special_tokens)``, at
a few dict and list look-ups per token instead of a call into the tokenizer.
"""

from __future__ import annotations

from codecs import utf_8_decode as _utf8_decode
import random
from collections.abc import Sequence
from typing import Any


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's map of the 256 byte values to printable characters, inverted: char -> byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_CHAR_BYTES = _bytes_to_unicode()
_BYTE_CHARS = frozenset(_CHAR_BYTES)
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in _CHAR_BYTES.items()})
# Tokenizers whose vocab was built (or found unsuitable), by id(); the tokenizer is kept with its
# entry so that its id is not reused while the entry lives.
_CACHE: dict[int, tuple[Any, ByteLevelVocab | None]] = {}
_CACHE_SIZE = 8
_PROBES = 512   # random ids decoded both ways before a vocab is trusted


class ByteLevelVocab:
    """The bytes of every model token and the content of every added token of one tokenizer."""

    __slots__ = ("token_bytes", "added", "special")

    def __init__(self, token_bytes: list[bytes | None], added: dict[int, str],
                 special: frozenset[int]) -> None:
        self.token_bytes = token_bytes   # None: an added token, or an id with no token
        self.added = added
        self.special = special

    @staticmethod
    def of(tokenizer: Any) -> ByteLevelVocab | None:
        """The vocab of a Hugging Face fast tokenizer that decodes as byte-level BPE; None for any
        other (its decode() is then the only reference)."""
        cached = _CACHE.get(id(tokenizer))
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        vocab = _build(tokenizer)
        if len(_CACHE) >= _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[id(tokenizer)] = (tokenizer, vocab)
        return vocab

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool) -> str:
        stream = ByteLevelStream(self, skip_special_tokens)
        return stream.add(token_ids) + stream.finish()


class ByteLevelStream:
    """One request's output, decoded incrementally: ``add`` returns the text of every complete
    character so far; bytes of a character still incomplete wait for the next ids."""

    __slots__ = ("_token_bytes", "_added", "_skipped", "_pending")

    def __init__(self, vocab: ByteLevelVocab, skip_special_tokens: bool) -> None:
        self._token_bytes = vocab.token_bytes
        self._added = vocab.added
        self._skipped = vocab.special if skip_special_tokens else frozenset()
        self._pending = b""   # the bytes of an incomplete character

    def add(self, token_ids: Sequence[int]) -> str:
        table = self._token_bytes
        if token_ids and min(token_ids) >= 0:
            # Model tokens only (the common case): their bytes joined at once. An added token (None
            # in the table) or an id past the table raises here, and takes the way below.
            try:
                data = self._pending + b"".join(map(table.__getitem__, token_ids))
            except (TypeError, IndexError):
                pass
            else:
                text, used = _utf8_decode(data, "replace", False)
                self._pending = data[used:]
                return text
        size = len(table)
        data = self._pending
        parts: list[str] = []
        for token_id in token_ids:
            piece = table[token_id] if 0 <= token_id < size else None
            if piece is not None:
                data += piece
                continue
            content = self._added.get(token_id)
            if content is None or token_id in self._skipped:
                continue   # skipped, or no such token: decode() drops it too
            # The bytes before an added token are decoded on their own: an incomplete character
            # there is replaced, not completed by bytes after it.
            parts.append(_utf8_decode(data, "replace", True)[0])
            parts.append(content)
            data = b""
        text, used = _utf8_decode(data, "replace", False)
        self._pending = data[used:]
        if not parts:
            return text
        parts.append(text)
        return "".join(parts)

    def finish(self) -> str:
        """An incomplete character at the very end, replaced as decode() does."""
        text = _utf8_decode(self._pending, "replace", True)[0]
        self._pending = b""
        return text


def _build(tokenizer: Any) -> ByteLevelVocab | None:
    backend = getattr(tokenizer, "_tokenizer", None)
    # clean_up_tokenization_spaces rewrites decoded text in Python: not byte-level any more.
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    try:
        from tokenizers.decoders import ByteLevel
    except ImportError:
        return None
    if not isinstance(getattr(backend, "decoder", None), ByteLevel):
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    added_tokens = backend.get_added_tokens_decoder()
    table: list[bytes | None] = [None] * size
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        if 0 <= token_id < size and token_id not in added_tokens:
            if _BYTE_CHARS.issuperset(token):
                table[token_id] = token.translate(_TO_LATIN1).encode("latin-1")
            else:   # ByteLevel decodes a token outside the byte map as its own UTF-8
                table[token_id] = token.encode()
    added = {i: t.content for i, t in added_tokens.items()}
    special = frozenset(i for i, t in added_tokens.items() if t.special)
    vocab = ByteLevelVocab(table, added, special)
    return vocab if _agrees(vocab, backend, size) else None


def _agrees(vocab: ByteLevelVocab, backend: Any, size: int) -> bool:
    """Random ids, and a character split by an added token, decode the same both ways."""
    rng = random.Random(0)
    probes = [[rng.randrange(size) for _ in range(rng.randint(1, 16))] for _ in range(_PROBES)]
    split = [i for i, b in enumerate(vocab.token_bytes) if b is not None and len(b) == 1
             and b[0] >= 0xC0][:1] + list(vocab.added)[:1]
    probes.append(split + split[::-1])
    for skip in (True, False):
        expected = backend.decode_batch(probes, skip_special_tokens=skip)
        if any(vocab.decode(ids, skip) != text for ids, text in zip(probes, expected)):
            return False
    return True
