"""Tokenizing a text piece by piece between its added tokens, the pieces seen before taken from a cache.

A Hugging Face fast tokenizer splits a text at its added tokens (specials such as ``<|im_start|>``)
before anything else, and normalizes, pre-tokenizes and tokenizes each piece between them on its own.
So a text's ids are its pieces' ids with the added tokens' ids between them, in order. A chat prompt
repeats most of its pieces from one request to the next (the template's turns, a system prompt): with
the pieces seen before cached, only the new ones are tokenized.

That holds where the tokenizer finds added tokens in the text as written (none strips the whitespace
beside it, matches single words only or is matched after normalization) and its pre-tokenizer treats a
piece alike wherever it stands (Metaspace, which marks the first piece, does not). ``PieceEncoder.of``
checks both, and that pieces and whole texts give the same ids on probes, before one is used.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable
from typing import Any

# Pre-tokenizers that split each piece on its own content alone.
_PIECEWISE_PRE_TOKENIZERS = frozenset({"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace",
                                       "WhitespaceSplit", "UnicodeScripts", "CharDelimiterSplit",
                                       "BertPreTokenizer"})
# The cache holds pieces of up to this many characters, this many characters in all.
MAX_PIECE_CHARS = 1 << 16
CACHE_CHARS = 1 << 22
_PROBES = 256


class PieceEncoder:
    """``encode(text)``: the ids of a text with no special tokens added, as ``encode_texts([text])``
    gives them, tokenizing only the pieces between added tokens that it has not seen lately."""

    def __init__(self, encode_texts: Callable[[list[str]], list[list[int]]], added: dict[str, int]) -> None:
        self._encode_texts = encode_texts
        self._added = added
        # Longest first: at a position, the longest added token there (as the tokenizer matches them).
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
                                 + ")").split
        self._cache: dict[str, list[int]] = {}   # in order of use, the latest last
        self._cached_chars = 0
        self._lock = threading.Lock()   # prompts are tokenized in executor threads too

    @staticmethod
    def of(backend: Any, encode_texts: Callable[[list[str]], list[list[int]]]) -> PieceEncoder | None:
        """One for ``backend`` (a ``tokenizers.Tokenizer``, encoding with ``encode_texts``) where piece by
        piece is exactly its encoding (see the module docstring); None elsewhere."""
        try:
            pre_tokenizer = backend.pre_tokenizer
            pre_tokenizer = json.loads(pre_tokenizer.__getstate__()) if pre_tokenizer is not None else None
            added_tokens = backend.get_added_tokens_decoder()
            normalized = backend.normalizer is not None
        except Exception:  # noqa: BLE001 - a backend that cannot say what it is: not used
            return None
        if not added_tokens or not _piecewise(pre_tokenizer):
            return None
        if any(t.lstrip or t.rstrip or t.single_word or (t.normalized and normalized)
               for t in added_tokens.values()):
            return None
        encoder = PieceEncoder(encode_texts, {t.content: i for i, t in added_tokens.items() if t.content})
        probes = _probes(list(encoder._added))
        if [encoder.encode(text) for text in probes] != encode_texts(probes):
            return None
        encoder._cache.clear()
        encoder._cached_chars = 0
        return encoder

    def encode(self, text: str) -> list[int]:
        parts = self._split(text)   # piece, added token, piece, ..., piece
        pieces = parts[::2]
        with self._lock:
            found = [self._take(piece) for piece in pieces]
        missing = [piece for piece, ids in zip(pieces, found) if ids is None]
        if missing:
            encoded = self._encode_texts(missing)
            with self._lock:
                for piece, ids in zip(missing, encoded):
                    self._keep(piece, ids)
            fill = iter(encoded)
            found = [ids if ids is not None else next(fill) for ids in found]
        out = list(found[0])   # type: ignore[arg-type]
        added = self._added
        for token, ids in zip(parts[1::2], found[1:]):
            out.append(added[token])
            out.extend(ids)   # type: ignore[arg-type]
        return out

    def _take(self, piece: str) -> list[int] | None:
        """The cached ids of ``piece`` (now its latest use), or None."""
        if not piece:
            return _NO_IDS
        ids = self._cache.pop(piece, None)
        if ids is not None:
            self._cache[piece] = ids
        return ids

    def _keep(self, piece: str, ids: list[int]) -> None:
        if len(piece) > MAX_PIECE_CHARS or piece in self._cache:
            return
        self._cache[piece] = ids
        self._cached_chars += len(piece)
        while self._cached_chars > CACHE_CHARS:   # the least recently used go
            oldest = next(iter(self._cache))
            self._cached_chars -= len(oldest)
            del self._cache[oldest]


_NO_IDS: list[int] = []   # an empty piece's (only read)


def _piecewise(pre_tokenizer: dict[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return True
    if pre_tokenizer.get("type") == "Sequence":
        return all(_piecewise(p) for p in pre_tokenizer.get("pretokenizers") or [])
    return pre_tokenizer.get("type") in _PIECEWISE_PRE_TOKENIZERS


def _probes(added: list[str]) -> list[str]:
    """Texts of words, numbers, spacing, punctuation, non-Latin text and added tokens, mixed."""
    rng = random.Random(0)
    words = ["hello", " world", "Hello", "  ", " ", "\n", "\n\n", " \n", "\t", "123", " 4567", "3.14", "'s",
             "don't", "!", "?!", "...", "é", "日本語", " 🙂", "ü", "-", "_x", "<", ">", "|", "a" * 40]
    specials = added[:8] + rng.sample(added, min(len(added), 8))
    texts = []
    for _ in range(_PROBES):
        parts = [rng.choice(words if rng.random() < 0.7 else specials) for _ in range(rng.randint(1, 12))]
        texts.append("".join(parts))
    return texts
