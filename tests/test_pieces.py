"""Tokenizing piece by piece between added tokens (inputs/pieces.py): the ids of the whole text."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from streamvlm.inputs import pieces
from streamvlm.inputs.chat import _backend_encoder
from streamvlm.inputs.pieces import PieceEncoder

from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def _random_texts(rng: random.Random, count: int) -> list[str]:
    words = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "user", "\n", " ",
             "  ", "system", "You are helpful.", " 42", "é", "日本", " 🙂", "def f():", "\t"]
    return ["".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(count)]


def test_pieces_give_the_ids_of_the_whole_text(tiny_tokenizer):
    encode_texts = _backend_encoder(tiny_tokenizer._tokenizer, encode_special_tokens=False)
    encoder = PieceEncoder.of(tiny_tokenizer._tokenizer, encode_texts)
    assert encoder is not None
    texts = _random_texts(random.Random(0), 400)
    for _ in range(2):   # the second time, the pieces come from the cache
        assert [encoder.encode(text) for text in texts] == encode_texts(texts)
    assert encoder.encode("") == tiny_tokenizer.encode("", add_special_tokens=False)


def test_the_cache_keeps_the_latest_pieces_within_its_bound(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(pieces, "CACHE_CHARS", 40)
    monkeypatch.setattr(pieces, "MAX_PIECE_CHARS", 20)
    encode_texts = _backend_encoder(tiny_tokenizer._tokenizer, encode_special_tokens=False)
    encoder = PieceEncoder.of(tiny_tokenizer._tokenizer, encode_texts)
    calls: list[list[str]] = []

    def counted(texts: list[str]) -> list[list[int]]:
        calls.append(texts)
        return encode_texts(texts)

    encoder._encode_texts = counted
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    for i in range(30):
        text = f"{system}<|im_start|>user\nquestion {i}<|im_end|>\n"
        assert encoder.encode(text) == encode_texts([text])[0]
    assert encoder._cached_chars <= 40
    # The system piece, used by every text, stays: only each new question is tokenized.
    assert all(texts == [f"user\nquestion {i}"] for i, texts in enumerate(calls[1:], 1))
    encoder.encode("<|im_start|>" + "x" * 30)   # over MAX_PIECE_CHARS: not kept
    assert "x" * 30 not in encoder._cache


def _tokenizer(pre_tokenizer, added: AddedToken) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab={chr(c): c - 32 for c in range(32, 127)} | {"▁": 95}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([added])
    return tokenizer


@pytest.mark.parametrize("pre_tokenizer, added", [
    (pre_tokenizers.Metaspace(prepend_scheme="first"), AddedToken("<s>", special=True)),   # marks the first piece
    (pre_tokenizers.ByteLevel(), AddedToken("<s>", special=True, lstrip=True)),   # takes the space before it
    (pre_tokenizers.ByteLevel(), AddedToken("<s>", special=True, single_word=True)),
])
def test_tokenizers_whose_pieces_depend_on_more_than_their_text_are_not_taken(pre_tokenizer, added):
    backend = _tokenizer(pre_tokenizer, added)
    assert PieceEncoder.of(backend, _backend_encoder(backend, encode_special_tokens=False)) is None
