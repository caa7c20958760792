"""The OpenAI-compatible HTTP API on a real server, through the openai SDK and raw HTTP."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from streamvlm import AsyncEngine, EngineConfig, SamplingParams
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.helpers import local_llm
from tests.live_server import LiveServer

KEY = "sk-test"
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(llama_path):
    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256,
                                      worker_backend="thread"))
    settings = GatewaySettings(api_key=KEY, served_model_name=MODEL, max_body_bytes=64 * 1024)
    live = LiveServer(build_app(engine, settings)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(llama_path):
    llm = local_llm(llama_path, max_model_len=256)
    yield llm
    llm.shutdown()


def http(server, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    timeout = kwargs.pop("timeout", 30)
    return httpx.request(method, server.base_url + path, headers=headers, timeout=timeout, **kwargs)


def wait_engine_idle(server, timeout: float = 10.0):
    engine = server.app.state.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.call(engine.stats())
        if stats.kv_blocks_used == 0 and stats.num_requests == 0 and stats.num_running == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {stats}")


def test_metrics_page(server, client):
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    page = http(server, "GET", "/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert "streamvlm:time_to_first_token_seconds_bucket" in page.text
    assert "streamvlm:kv_cache_usage" in page.text
    # Open to scrapers by default (metrics_auth="none") while the API needs the key.
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    assert httpx.get(server.base_url + "/v1/models").status_code == 401


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.base_url + "/health")   # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_matches_offline_greedy(client, reference):
    expected = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=20))[0]
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                          max_tokens=20)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_chat_with_usage(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=24)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens


def test_completions_string_and_token_ids(client, reference):
    expected = reference.generate("The quick brown fox", SamplingParams(temperature=0,
                                                                        max_tokens=12))[0]
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12,
                                     temperature=0)
    assert resp.choices[0].text == expected.text
    by_ids = client.completions.create(model=MODEL, prompt=expected.prompt_token_ids,
                                       max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected.text
    streamed = client.completions.create(model=MODEL, prompt="The quick brown fox",
                                         max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_logprobs_and_extra_fields(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1,
                                    "ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= 0
    legacy = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, logprobs=2,
                                       temperature=0)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 4


def test_seed_and_stop(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=11)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b
    greedy = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                            temperature=0).choices[0].message.content
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                             temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert greedy.startswith(stopped.choices[0].message.content)


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "malformed JSON"),
    (json.dumps({"model": MODEL}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": "ten"}).encode(), 400,
     "max_tokens"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 100000}).encode(), 400,
     "maximum context length"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": -1}).encode(), 400,
     "temperature"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "n": 17}).encode(), 400, "n must"),
    (json.dumps({"model": "other", "messages": MESSAGES}).encode(), 404, "does not exist"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(),
     400, "image"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}
                ).encode(), 413, "limit"),
])
def test_bad_requests_get_openai_errors(server, client, body, status, needle):
    resp = http(server, "POST", "/v1/chat/completions", content=body,
                headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"]
    # The server keeps serving.
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_api_key_required(server):
    no_key = httpx.post(server.base_url + "/v1/chat/completions",
                        json={"model": MODEL, "messages": MESSAGES})
    assert no_key.status_code == 401 and "error" in no_key.json()
    wrong = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope",
                      max_retries=0).models.list()


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as resp:
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    wait_engine_idle(server)


def test_disconnect_while_waiting_for_a_full_response_aborts(server):
    finished = server.app.state.engine.metrics.requests_finished
    aborted_before = finished.get("abort", 0)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 230, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http(server, "POST", "/v1/chat/completions", json=body, timeout=0.05)
    wait_engine_idle(server)
    assert finished.get("abort", 0) == aborted_before + 1


def test_health_is_503_once_the_worker_died(llama_path):
    import os
    import signal

    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256))
    live = LiveServer(build_app(engine, GatewaySettings())).start()
    try:
        assert httpx.get(live.base_url + "/health").status_code == 200
        os.kill(engine.groups[0].process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            health = httpx.get(live.base_url + "/health")
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert health.json()["groups"][0]["error"]
        dead = httpx.post(live.base_url + "/v1/completions",
                          json={"prompt": "hello", "max_tokens": 4})
        assert dead.status_code == 503 and "error" in dead.json()
    finally:
        live.stop()
