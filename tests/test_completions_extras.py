"""/v1/completions with several prompts, echo, and stream_options.continuous_usage_stats (chat
too), through the openai SDK on the tiny llama checkpoint."""

from __future__ import annotations

import httpx
import openai
import pytest

from streamvlm import AsyncEngine, EngineConfig
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.live_server import LiveServer

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "Hello", "What is the capital of France?"]
SAMPLED = dict(temperature=1.0, seed=5, max_tokens=6, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(llama_path):
    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=128,
                                      worker_backend="thread"))
    live = LiveServer(build_app(engine, GatewaySettings(served_model_name=MODEL,
                                                        max_prompts_per_request=4))).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def num_tokens(server, text: str) -> int:
    return len(server.app.state.engine.tokenizer.encode(text))


def streamed(stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    texts, reasons, chunks = {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text or "")
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


# ---- several prompts --------------------------------------------------------------------------

def test_several_prompts_each_with_n_choices(client, server):
    out = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, **SAMPLED)
    assert [c.index for c in out.choices] == list(range(6))
    # Prompt i's choice j is index i * n + j, the same text as prompt i asked alone.
    for i, prompt in enumerate(PROMPTS):
        alone = client.completions.create(model=MODEL, prompt=prompt, n=2, **SAMPLED)
        assert [c.text for c in out.choices[2 * i:2 * i + 2]] == [c.text for c in alone.choices]
    assert out.usage.prompt_tokens == sum(num_tokens(server, p) for p in PROMPTS)
    assert out.usage.completion_tokens == 6 * 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 36


def test_several_token_id_prompts(client, server):
    ids = [server.app.state.engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert [c.text for c in out.choices] == [c.text for c in by_text.choices]
    assert [c.index for c in out.choices] == [0, 1]


def test_several_prompts_streamed(client, server):
    full = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, **SAMPLED)
    texts, reasons, chunks = streamed(client.completions.create(
        model=MODEL, prompt=PROMPTS, n=2, stream=True, stream_options={"include_usage": True},
        **SAMPLED))
    assert [texts[i] for i in range(6)] == [c.text for c in full.choices]
    assert reasons == {i: "length" for i in range(6)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 36
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("prompt, message", [
    (["a", "b", "c", "d", "e"], "at most 4"),
    (["a", [1, 2]], "prompt must be"),
    ([], "prompt must be"),
    ([[1, 2], [3, True]], "prompt must be"),
])
def test_bad_prompt_lists_are_400s(server, prompt, message):
    resp = httpx.post(server.base_url + "/v1/completions",
                      json={"prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and error["param"] == "prompt"


def test_one_refused_prompt_refuses_the_call(client, server):
    vocab = server.app.state.engine.processor.vocab_size
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
            client.completions.create(model=MODEL, prompt=[[5, 6], [vocab + 1]], max_tokens=2,
                                      stream=stream)
        long = "word " * 200
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=["Hi", long], max_tokens=2, stream=stream)
    assert not idle_worker(server).sequences


# ---- echo -------------------------------------------------------------------------------------

def test_echo_puts_the_prompt_before_each_choice(client, server):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, **SAMPLED)
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, echo=True, **SAMPLED)
    assert [c.text for c in echoed.choices] == [PROMPTS[i // 2] + c.text
                                                for i, c in enumerate(plain.choices)]
    ids = server.app.state.engine.tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=3,
                                       temperature=0)
    text = server.app.state.engine.tokenizer.decode(ids)
    assert by_ids.choices[0].text.startswith(text)
    # Streamed: each choice's first chunk starts with its prompt.
    texts, _, _ = streamed(client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2,
                                                     echo=True, stream=True, **SAMPLED))
    assert [texts[i] for i in range(4)] == [c.text for c in echoed.choices]


def test_echo_with_logprobs_scores_the_prompt(client, server):
    tokenizer = server.app.state.engine.tokenizer
    prompt_ids = tokenizer.encode(PROMPTS[2])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], echo=True, logprobs=2,
                                    max_tokens=3, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(prompt_ids) + 3
    assert lp.tokens[:len(prompt_ids)] == [tokenizer.decode([t]) for t in prompt_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    # The prompt's logprobs are those prompt_logprobs reports.
    scored = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=1,
                                       extra_body={"prompt_logprobs": 0})
    entries = scored.choices[0].model_extra["prompt_logprobs"]
    assert lp.token_logprobs[1:len(prompt_ids)] == [
        entries[p][str(prompt_ids[p])]["logprob"] for p in range(1, len(prompt_ids))]
    assert lp.text_offset[len(prompt_ids)] == len(PROMPTS[2])
    # Streamed, the same columns.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], echo=True, logprobs=2,
                                            max_tokens=3, temperature=0, stream=True))
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    values = [v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert tokens == lp.tokens and values == lp.token_logprobs


# ---- continuous usage -------------------------------------------------------------------------

def test_continuous_usage_on_every_completion_chunk(client, server):
    _, _, chunks = streamed(client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], n=2, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **SAMPLED))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4 * 6
    seen: dict[int, int] = {}
    for chunk in content:
        [choice] = chunk.choices
        prompt_tokens = num_tokens(server, PROMPTS[choice.index // 2])
        assert chunk.usage.prompt_tokens == prompt_tokens
        assert chunk.usage.completion_tokens >= seen.get(choice.index, 0)
        assert chunk.usage.total_tokens == prompt_tokens + chunk.usage.completion_tokens
        seen[choice.index] = chunk.usage.completion_tokens
    assert seen == {i: 6 for i in range(4)}


def test_continuous_usage_on_every_chat_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=2, seed=1,
        temperature=1.0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    *content, last = chunks
    assert all(c.usage is not None for c in chunks)
    assert [c.usage.completion_tokens for c in content[:2]] == [0, 0]   # the role openings
    assert {c.choices[0].index: c.usage.completion_tokens for c in content} == {0: 5, 1: 5}
    assert last.usage.completion_tokens == 10
    # Without include_usage, continuous_usage_stats adds nothing (as vLLM's).
    plain = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
        stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)


def idle_worker(server):
    """The server's worker once it holds no request (late aborts land asynchronously)."""
    import time

    worker = server.app.state.engine.groups[0].local_worker
    for _ in range(200):
        if not worker.sequences:
            break
        time.sleep(0.05)
    return worker


def test_disconnect_aborts_every_prompt(server, monkeypatch):
    """A client leaving a streamed several-prompt call aborts all of its requests."""
    import time

    worker = server.app.state.engine.groups[0].local_worker
    step = worker.step

    def slow_step():   # 100 tokens take seconds: every choice is surely running at the disconnect
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(worker, "step", slow_step)
    finished = server.app.state.engine.metrics.requests_finished
    aborted_before = finished.get("abort", 0)
    body = {"model": MODEL, "prompt": PROMPTS, "n": 2, "max_tokens": 100, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as resp:
        assert next(resp.iter_lines()).startswith("data: ")
    worker = idle_worker(server)
    assert not worker.sequences and not any(worker.pool.ref_counts)
    assert finished.get("abort", 0) == aborted_before + 6
