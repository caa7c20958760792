"""logit_bias, bad_words and n > 1: in the Sampler on hand-made logits, and through the HTTP API
with the openai SDK on the tiny llama checkpoint."""

from __future__ import annotations

import msgspec
import openai
import pytest
import torch

from streamvlm import AsyncEngine, EngineConfig
from streamvlm.contract.sampling import SamplingParams
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.live_server import LiveServer
from workers.sampler import Sampler
from workers.sequence import Sequence

KEY = "sk-test"
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def make_seq(prompt: list[int], output: list[int] = (), **params) -> Sequence:
    seq = Sequence("r", list(prompt), SamplingParams(**params), [2], 0)
    for t in output:
        seq.append_token(t, None)
    return seq


# ---- SamplingParams ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(logit_bias={1: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logit_bias={"1": 1}), "logit_bias"),
    (dict(logit_bias={i: 1 for i in range(301)}), "logit_bias"),
    (dict(bad_words=[""]), "bad_words"),
    (dict(bad_words=["x"] * 101), "bad_words"),
    (dict(bad_words_token_ids=[[]]), "bad_words_token_ids"),
    (dict(n=0), "n must"),
    (dict(n=17), "n must"),
])
def test_extras_are_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_only_bad_words_read_history():
    assert not SamplingParams(logit_bias={3: 5}).reads_history
    assert SamplingParams(bad_words_token_ids=[[3]]).reads_history


# ---- the Sampler ------------------------------------------------------------------------------

LOGITS = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]


def test_logit_bias_applies_to_its_row_only():
    sampler = Sampler(torch.device("cpu"), seed=0)
    biased, plain = make_seq([0], logit_bias={3: 10.0, 0: -2.5}), make_seq([0])
    out = sampler._apply_logit_bias(torch.tensor([LOGITS, LOGITS]), [biased, plain])
    assert out[0].tolist() == [-0.5, -1.0, 0.5, 7.0, 1.0, 0.0]
    assert out[1].tolist() == LOGITS
    # A large bias forces the token, greedy or sampled.
    for temperature in (0.0, 1.0):
        seq = make_seq([0], logit_bias={5: 100}, temperature=temperature)
        assert sampler(torch.tensor([LOGITS]), [seq]).token_ids == [5]


def test_bad_words_ban_the_last_token_after_their_prefix():
    sampler = Sampler(torch.device("cpu"), seed=0)
    words = [[0], [4, 2], [1, 3, 5]]
    cases = [([], {0}), ([4], {0, 2}), ([2, 4], {0, 2}), ([1, 3], {0, 5}), ([3], {0}),
             ([1, 3, 4], {0, 2})]
    for output, banned in cases:
        seq = make_seq([4, 1, 3], output, bad_words_token_ids=words)
        out = sampler._ban_bad_words(torch.tensor([LOGITS]), [seq])[0].tolist()
        assert {i for i, v in enumerate(out) if v == float("-inf")} == banned, output
    plain = make_seq([4], [4])
    assert sampler._ban_bad_words(torch.tensor([LOGITS]), [plain])[0].tolist() == LOGITS
    seq = make_seq([0], [4], temperature=0, bad_words_token_ids=words)
    assert sampler(torch.tensor([LOGITS]), [seq]).token_ids == [4]   # 0 and 2 banned


# ---- over HTTP --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(llama_path):
    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256,
                                      worker_backend="thread"))
    live = LiveServer(build_app(engine, GatewaySettings(api_key=KEY, served_model_name=MODEL))
                      ).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def test_large_logit_bias_forces_a_token(client, server):
    tokenizer = server.app.state.engine.tokenizer
    token = tokenizer.encode(" Paris", add_special_tokens=False)[-1]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=1.0,
                                    seed=3, logit_bias={str(token): 100})
    assert out.choices[0].text == tokenizer.decode([token] * 6)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                          logit_bias={str(token): 100}, temperature=0)
    assert chat.choices[0].message.content == tokenizer.decode([token] * 5)


def test_logit_bias_outside_the_vocabulary_is_a_400(client, server):
    vocab = server.app.state.engine.processor.vocab_size
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                  logit_bias={str(vocab): 5})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                  logit_bias={"x": 5})


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_bad_words_never_appear(client, server):
    engine = server.app.state.engine
    tokenizer = engine.tokenizer
    prompt = "The quick brown fox"
    free = server.call(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=24,
                                                              ignore_eos=True)))
    # Greedy would write these: one single-token word and one two-token word.
    words = [tokenizer.decode(free.token_ids[:1]), tokenizer.decode(free.token_ids[2:4])]
    banned = [tokenizer.encode(t, add_special_tokens=False) for w in words for t in (w, " " + w)]
    for temperature, seed in [(0, None), (0.8, 0), (0.8, 1)]:
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=24,
                                ignore_eos=True, bad_words=words)
        out = server.call(engine.generate(prompt, params))
        assert len(out.token_ids) == 24
        assert not any(contains(out.token_ids, ids) for ids in banned), (words, out.token_ids)
    # Over HTTP: the extra field reaches the sampler (greedy now differs from the free output).
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"bad_words": words, "ignore_eos": True})
    assert out.choices[0].text != free.text


# ---- n > 1 ------------------------------------------------------------------------------------

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 5


def test_n_choices_are_reproducible_and_share_the_prompt_blocks(client, server):
    engine = server.app.state.engine
    block_size = engine.config.cache.block_size
    params = SamplingParams(n=4, seed=11, temperature=1.0, max_tokens=16, ignore_eos=True)
    outs = server.call(engine.generate_choices(LONG_PROMPT, params))
    prompt_len = len(outs[0].prompt_token_ids)
    full_blocks = prompt_len // block_size
    assert full_blocks >= 4
    # The first choice computes the prompt; the others find its full blocks in the prefix cache.
    assert all(o.num_cached_tokens >= full_blocks * block_size for o in outs[1:])
    assert len({tuple(o.token_ids) for o in outs}) > 1      # seeds seed + i: distinct samples

    # Through the openai SDK: the same 4 choices twice, with their index; usage counts them all.
    def ask():
        return client.completions.create(model=MODEL, prompt=LONG_PROMPT, n=4, seed=11,
                                         max_tokens=16, temperature=1.0,
                                         extra_body={"ignore_eos": True})
    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.text for c in first.choices] == [o.text for o in outs]
    assert first.usage.prompt_tokens == prompt_len
    assert first.usage.completion_tokens == 4 * 16


def test_n_choices_use_well_under_n_times_the_blocks(server):
    """The peak of KV blocks in use while 4 choices decode, against one request's."""
    import threading

    engine = server.app.state.engine
    block_size = engine.config.cache.block_size

    def peak_blocks(params: SamplingParams) -> int:
        peak, done = 0, threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.call(engine.stats()).kv_blocks_used)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            server.call(engine.generate_choices(LONG_PROMPT, params), timeout=60)
        finally:
            done.set()
            poller.join()
        return peak

    params = SamplingParams(seed=1, temperature=1.0, max_tokens=48, ignore_eos=True)
    one = peak_blocks(params)
    four = peak_blocks(msgspec.structs.replace(params, n=4))
    prompt_len = len(engine.processor.tokenizer.encode(LONG_PROMPT))
    alone = -(-(prompt_len + 48) // block_size)
    assert 0 < one <= alone
    # Shared prompt blocks: each extra choice adds only its own tail blocks.
    assert four < 2 * alone, (one, four, alone)


def test_n_choices_stream_with_their_index(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=4,
                                            max_tokens=8, temperature=1.0, stream=True,
                                            stream_options={"include_usage": True})
    texts, finished, usage = {}, set(), None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=4,
                                          max_tokens=8, temperature=1.0)
    assert [texts[i] for i in range(3)] == [c.message.content for c in full.choices]
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_n_is_bounded_and_plain_stream_refuses_it(client, server):
    with pytest.raises(openai.BadRequestError, match="n must"):
        client.completions.create(model=MODEL, prompt="Hi", n=17, max_tokens=2)
    with pytest.raises(ValueError, match="stream_choices"):
        server.call(server.app.state.engine.generate("Hi", SamplingParams(n=2, max_tokens=2)))
