from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from streamvlm.engine.byte_level import ByteLevelStream, ByteLevelVocab
from streamvlm.engine.detokenizer import IncrementalDetokenizer, WindowDecoder
from tests.tiny_tokenizer import build_tiny_tokenizer

SPECIAL_IDS = [0, 1, 2]
MULTIBYTE_TEXT = "héllo wörld 日本語 emoji 🙂 — café 😀🎉 東京 Straße"


class DecodeOnly:
    """A tokenizer seen only through decode() and encode(): the detokenizer cannot use its
    byte table, and decodes in a window."""

    def __init__(self, tokenizer) -> None:
        self._inner = tokenizer

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self._inner.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str, **kwargs) -> list[int]:
        return self._inner.encode(text, **kwargs)

    def __len__(self) -> int:
        return len(self._inner)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module", params=["byte_level", "window"])
def tokenizer(request, tiny_tokenizer):
    """Every detokenizer test runs on both decoders: the byte table and the window."""
    return tiny_tokenizer if request.param == "byte_level" else DecodeOnly(tiny_tokenizer)


def chunked(ids: list[int], rng: random.Random, max_chunk: int) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        chunks.append(ids[i:i + n])
        i += n
    return chunks


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [detok.add_tokens(chunk) for chunk in chunks]


def random_ids(rng: random.Random, tokenizer, n: int) -> list[int]:
    """Random ids, with special tokens and stretches of multi-byte text mixed in."""
    text_ids = tokenizer.encode(MULTIBYTE_TEXT)
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.1:
            ids.append(rng.choice(SPECIAL_IDS))
        elif r < 0.3:
            start = rng.randrange(len(text_ids))
            ids.extend(text_ids[start:start + rng.randint(1, 8)])
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids[:n]


# --- the tiny tokenizer -------------------------------------------------------------------------

def test_tiny_tokenizer_round_trip(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer
    assert len(tokenizer) <= 512
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None

    build_tiny_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (2, 0, None)
    for text in [MULTIBYTE_TEXT, "The quick brown fox.<|im_end|>", "<|im_start|>user\nhi"]:
        ids = loaded.encode(text)
        assert ids == tokenizer.encode(text)
        assert loaded.decode(ids) == text
    assert loaded.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]


def test_tiny_tokenizer_is_deterministic(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer
    again = build_tiny_tokenizer(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.encode(MULTIBYTE_TEXT) == tokenizer.encode(MULTIBYTE_TEXT)


def test_tiny_tokenizer_chat_template(tmp_path):
    build_tiny_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
    assert loaded.apply_chat_template(messages, tokenize=False) == expected
    assert (loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == expected + "<|im_start|>assistant\n")
    content = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "🙂"}]
    assert (loaded.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
            == "<|im_start|>user\nHi 🙂<|im_end|>\n")


# --- the invariant ------------------------------------------------------------------------------

def test_byte_level_tokenizer_decodes_without_the_tokenizer(tiny_tokenizer):
    assert IncrementalDetokenizer(tiny_tokenizer, []).decodes_without_tokenizer
    assert not IncrementalDetokenizer(DecodeOnly(tiny_tokenizer), []).decodes_without_tokenizer
    assert ByteLevelVocab.of(DecodeOnly(tiny_tokenizer)) is None


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_table_matches_decode_on_invalid_bytes(tiny_tokenizer, skip_special_tokens):
    """Random single-byte tokens (mostly invalid UTF-8: stray continuation bytes, lead bytes cut
    short) with special tokens between them: replaced exactly as the tokenizer replaces them."""
    vocab = ByteLevelVocab.of(tiny_tokenizer)
    byte_ids = [i for i, b in enumerate(vocab.token_bytes) if b is not None and len(b) == 1]
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() > 0.1 else rng.choice(SPECIAL_IDS)
               for _ in range(rng.randint(1, 12))]
        expected = tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        detok = IncrementalDetokenizer(tiny_tokenizer, [], skip_special_tokens=skip_special_tokens)
        assert "".join(detok.add_tokens([i]) for i in ids) + detok.finish() == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_table_chunks_of_bytes_and_unknown_ids(tiny_tokenizer, skip_special_tokens):
    """Chunks of single-byte tokens, special tokens and ids with no token (past the vocab, or
    negative) decode as the tokenizer decodes the ids it knows: the unknown ones are dropped."""
    vocab = ByteLevelVocab.of(tiny_tokenizer)
    byte_ids = [i for i, b in enumerate(vocab.token_bytes) if b is not None and len(b) == 1]
    unknown = [len(vocab.token_bytes), len(vocab.token_bytes) + 7, -1, -len(vocab.token_bytes)]
    rng = random.Random(2)
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() > 0.15 else rng.choice(SPECIAL_IDS + unknown)
               for _ in range(rng.randint(1, 24))]
        known = [i for i in ids if i not in unknown]
        expected = tiny_tokenizer.decode(known, skip_special_tokens=skip_special_tokens)
        stream = ByteLevelStream(vocab, skip_special_tokens)
        text = "".join(stream.add(chunk) for chunk in chunked(ids, rng, 6)) + stream.finish()
        assert text == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_matches_full_decode_for_any_chunking(tokenizer, seed, skip_special_tokens):
    rng = random.Random(seed)
    ids = random_ids(rng, tokenizer, rng.randint(1, 120))
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    for max_chunk in [1, 2, 5, 200]:
        detok = IncrementalDetokenizer(tokenizer, [1, 5, 6],
                                       skip_special_tokens=skip_special_tokens)
        pieces = stream(detok, chunked(ids, rng, max_chunk))
        assert "".join(pieces) + detok.finish() == expected
        assert detok.text == expected
        assert detok.stop_string_hit is None and detok.num_tokens_at_stop is None


@pytest.mark.parametrize("text", [MULTIBYTE_TEXT, "🙂🙂🙂", "日本語", "x\ufffdy\ufffdz",
                                  "a" * 50 + "😀"])
def test_no_replacement_char_mid_stream_for_valid_text(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = stream(detok, [[i] for i in ids])
    assert "".join(pieces) + detok.finish() == text
    # Only the real U+FFFD characters of the text are ever emitted.
    assert "".join(pieces).count("\ufffd") == text.count("\ufffd")
    # A character is emitted whole, in the call that completes it.
    decoded_so_far = ""
    for n, piece in enumerate(pieces, start=1):
        decoded_so_far += piece
        assert tokenizer.decode(ids[:n]).startswith(decoded_so_far)


def test_incomplete_character_at_end_is_emitted_by_finish(tokenizer):
    ids = tokenizer.encode("ok 🙂")
    truncated = ids[:-1]  # the emoji's last byte is missing
    detok = IncrementalDetokenizer(tokenizer, [])
    out = "".join(stream(detok, [[i] for i in truncated]))
    assert "\ufffd" not in out
    tail = detok.finish()
    assert out + tail == tokenizer.decode(truncated) and tail.endswith("\ufffd")
    assert detok.finish() == "" and detok.add_tokens([5]) == ""


def test_special_tokens_between_bytes_of_a_character(tokenizer):
    ids = tokenizer.encode("日本語")  # the last character spans several byte tokens
    ids = ids[:-1] + [2, 0] + ids[-1:]
    for skip in [True, False]:
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        out = "".join(stream(detok, [[i] for i in ids])) + detok.finish()
        assert out == tokenizer.decode(ids, skip_special_tokens=skip)


def test_window_stays_bounded(tokenizer):
    """Long runs of skipped special tokens, real U+FFFDs or invalid bytes keep the window short."""
    rng = random.Random(0)
    invalid = tokenizer.encode("🙂")[:1] * 50  # a lead byte over and over: never a character
    for ids in [[0, 1, 2] * 100, tokenizer.encode("\ufffd" * 200), invalid,
                random_ids(rng, tokenizer, 500)]:
        detok = IncrementalDetokenizer(tokenizer, [], stop=["never"])
        longest = 0
        out = []
        for i in ids:
            out.append(detok.add_tokens([i]))
            if isinstance(detok._ids, WindowDecoder):
                longest = max(longest, len(detok._ids.window))
        out.append(detok.finish())
        assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True)
        assert longest <= 20


# --- stop strings -------------------------------------------------------------------------------

def run_stop(tokenizer, text: str, stop: list[str], max_chunk: int = 1, seed: int = 0):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
    pieces = stream(detok, chunked(ids, random.Random(seed), max_chunk))
    return detok, pieces, ids


@pytest.mark.parametrize("max_chunk", [1, 3, 100])
def test_single_stop_string(tokenizer, max_chunk):
    text = "Hello world, the quick brown fox"
    detok, pieces, ids = run_stop(tokenizer, text, [" the quick"], max_chunk)
    assert "".join(pieces) == "Hello world," == detok.text
    assert detok.stop_string_hit == " the quick"
    assert detok.finish() == ""
    assert detok.add_tokens([5, 6]) == ""
    n = detok.num_tokens_at_stop
    assert n is not None and " the quick" in tokenizer.decode(ids[:n])
    if max_chunk == 1:  # exact: the token before did not complete it
        assert " the quick" not in tokenizer.decode(ids[:n - 1])


def test_stop_string_spanning_tokens(tokenizer):
    text = "The capital of France is Paris."
    ids = tokenizer.encode(text)
    stop = "ance is Pa"
    # The stop string starts and ends inside tokens.
    assert all(stop not in tokenizer.decode([i]) for i in ids)
    detok, pieces, _ = run_stop(tokenizer, text, [stop])
    assert "".join(pieces) == "The capital of Fr"
    assert detok.stop_string_hit == stop
    n = detok.num_tokens_at_stop
    assert stop in tokenizer.decode(ids[:n]) and stop not in tokenizer.decode(ids[:n - 1])


def test_several_stop_strings_first_to_complete_wins(tokenizer):
    detok, pieces, _ = run_stop(tokenizer, "one two three four", ["four", "two", "three"])
    assert "".join(pieces) == "one " and detok.stop_string_hit == "two"
    # Both complete with the same character: the earlier start wins, so less text is emitted.
    detok, pieces, _ = run_stop(tokenizer, "one two three", ["e", "three"], max_chunk=100)
    assert "".join(pieces) == "on" and detok.stop_string_hit == "e"
    detok, pieces, _ = run_stop(tokenizer, "xx abc yy", ["bc", "abc"], max_chunk=100)
    assert "".join(pieces) == "xx " and detok.stop_string_hit == "abc"


def test_stop_at_very_start(tokenizer):
    detok, pieces, _ = run_stop(tokenizer, "Hello world", ["Hel"])
    assert "".join(pieces) == "" == detok.text
    assert detok.stop_string_hit == "Hel" and detok.num_tokens_at_stop is not None
    assert detok.finish() == ""


def test_near_miss_prefix_is_held_then_released(tokenizer):
    text = "the cat sat on the"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["the dog"])
    emitted = ""
    for n, i in enumerate(ids, start=1):
        emitted += detok.add_tokens([i])
        decoded = tokenizer.decode(ids[:n])
        # Whatever is held is a suffix that could still start "the dog".
        held = decoded[len(emitted):]
        assert decoded.startswith(emitted)
        assert held == "" or "the dog".startswith(held)
    assert detok.text == "the cat sat on " and emitted == "the cat sat on "
    assert detok.finish() == "the"
    assert detok.text == text and detok.stop_string_hit is None


def test_stop_string_that_never_matches(tokenizer):
    text = "Numbers like 0 1 2 3"
    for max_chunk in [1, 4]:
        detok, pieces, ids = run_stop(tokenizer, text, ["3 4", "Numbers unlike"], max_chunk)
        assert "".join(pieces) == "Numbers like 0 1 2 "
        assert detok.finish() == "3"
        assert detok.stop_string_hit is None and detok.num_tokens_at_stop is None
        assert detok.text == text == tokenizer.decode(ids)


def test_multibyte_stop_string(tokenizer):
    detok, pieces, ids = run_stop(tokenizer, "emoji 🙂 and more", ["🙂"])
    assert "".join(pieces) == "emoji " and detok.stop_string_hit == "🙂"
    assert detok.num_tokens_at_stop == len(tokenizer.encode("emoji 🙂"))


def test_stop_strings_searched_in_output_only(tokenizer):
    prompt = tokenizer.encode("Say STOP")
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=["STOP"])
    out = detok.add_tokens(tokenizer.encode("P now")) + detok.finish()
    assert out == "P now" and detok.stop_string_hit is None


@pytest.mark.parametrize("seed", range(4))
def test_random_stop_strings_match_reference(tokenizer, seed):
    """Emitted text is the decoded output up to the first stop string to complete."""
    rng = random.Random(seed)
    text = "".join(rng.choice(["ab", "ba", "a", "b", " ", "日", "🙂", "é"]) for _ in range(60))
    stops = [text[s:s + rng.randint(2, 5)] for s in (rng.randrange(len(text)) for _ in range(2))]
    stops.append("zz")
    first_end = min((text.find(s) + len(s) for s in stops if s in text), default=None)
    for max_chunk in [1, 3]:
        detok, pieces, _ = run_stop(tokenizer, text, stops, max_chunk, seed)
        out = "".join(pieces) + detok.finish()
        assert "\ufffd" not in out
        if first_end is None:
            assert out == text
        else:
            hit = detok.stop_string_hit
            assert hit is not None and out + hit == text[:len(out) + len(hit)]
            assert len(out) + len(hit) == first_end


def test_stop_strings_wait_for_min_tokens(tokenizer) -> None:
    ids = tokenizer.encode("stop here and stop there", add_special_tokens=False)
    early = IncrementalDetokenizer(tokenizer, [], stop=["stop"])
    early.add_tokens(ids)
    assert early.stop_string_hit == "stop" and early.text == ""
    late = IncrementalDetokenizer(tokenizer, [], stop=["stop"], min_tokens=3)
    late.add_tokens(ids)
    assert late.stop_string_hit == "stop"
    assert late.text == "stop here and "
    assert late.num_tokens_at_stop > 3


# --- stop strings in linear time and memory ---------------------------------------------------------

def naive_stop_stream(pieces: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    """The reference: after each piece, release everything but the longest suffix that begins a stop
    string; stop at the first stop string to complete (the earliest start on a tie)."""
    text, released, out = "", 0, []
    for piece in pieces:
        start_len = len(text)
        text += piece
        ends = [(text.find(s, max(0, start_len - len(s) + 1)) + len(s), -len(s), s) for s in stops
                if text.find(s, max(0, start_len - len(s) + 1)) >= 0]
        if ends:
            end, _, stop = min(ends)
            out.append(text[released:end - len(stop)])
            return out, stop
        keep = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out.append(text[released:len(text) - keep])
        released = len(text) - keep
    return out, None


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_matches_naive_reference(seed):
    from streamvlm.engine.stop_strings import StopStringMatcher

    rng = random.Random(seed)
    alphabet = "aab" if seed % 2 else "abc"
    text = "".join(rng.choice(alphabet) for _ in range(200))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 4))]
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        pieces.append(text[i:i + n])
        i += n
    matcher = StopStringMatcher(stops)
    out, hit = [], None
    for piece in pieces:
        released, hit = matcher.feed(piece)
        out.append(released)
        if hit is not None:
            break
    expected, expected_hit = naive_stop_stream(pieces, stops)
    assert (out, hit) == (expected, expected_hit)


def test_long_stop_string_costs_linear_memory(tokenizer):
    """A 100 KB stop string, and output that follows it for a long stretch before it departs: what the
    detokenizer keeps grows with the stop string, not with its square."""
    import tracemalloc

    stop = "ab" * 50_000 + "!"
    text = "ab" * 2_000 + "a, and then more"
    ids = tokenizer.encode(text)
    tracemalloc.start()
    try:
        detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
        longest_held = 0
        out = []
        for i in ids:
            out.append(detok.add_tokens([i]))
            longest_held = max(longest_held, detok._stop.held_len)
        out.append(detok.finish())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "".join(out) == text and detok.stop_string_hit is None
    assert longest_held == 4001    # "ab" * 2000 + "a" could still begin the stop string
    # The KMP table (a list of ints) and copies of text: a few dozen bytes per character.
    assert peak < 64 * len(stop)


def test_long_stop_string_match_is_found(tokenizer):
    stop = "xy" * 5_000
    text = "start " + stop + " end"
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    out = "".join(detok.add_tokens([i]) for i in tokenizer.encode(text))
    assert out == "start " and detok.stop_string_hit == stop
