"""What a vLLM user expects of the server beyond generation, through HTTP and the WebSocket:
chat_template_kwargs, tool-call messages, /v1/models/{id}, /tokenize, /detokenize,
/v1/apply_template, /version, JSON 404/405, /metrics without the key, CORS, and unknown request
fields refused by name."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from streamvlm import AsyncEngine, EngineConfig
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.live_server import LiveServer
from tests.test_ws import open_ws, recv, send
from tests.tiny_tokenizer import build_tiny_tokenizer

KEY = "sk-surface"
MODEL = "org/tiny-tools"     # a slash, as hub names have
ORIGIN = "https://app.example"
# ChatML that reads a kwarg (enable_thinking), renders assistant tool calls (content null; their
# arguments as objects, written with tojson) and tool results, as Qwen3's template does.
TOOL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined %}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '[call ' + call['function']['name'] + ' ' + call['function']['arguments'] | tojson + ']' }}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{{- ' [for ' + message['tool_call_id'] + ']' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '[no thinking]' }}{%- endif %}"
    "{%- endif %}"
)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_TURNS = [
    *MESSAGES,
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def checkpoint(llama_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "llama"
    shutil.copytree(llama_path, path)
    build_tiny_tokenizer(path, chat_template=TOOL_TEMPLATE)
    return path


def start(checkpoint, **settings) -> LiveServer:
    engine = AsyncEngine(EngineConfig(model=str(checkpoint), max_model_len=256,
                                      worker_backend="thread"))
    return LiveServer(build_app(engine, GatewaySettings(api_key=KEY, served_model_name=MODEL,
                                                        **settings))).start()


@pytest.fixture(scope="module")
def server(checkpoint):
    live = start(checkpoint, allowed_origins=[ORIGIN])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def lenient_server(checkpoint):
    live = start(checkpoint, metrics_auth="key", ignore_unknown_fields=True)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def http(live, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kwargs.pop("headers", {})}
    return httpx.request(method, live.base_url + path, headers=headers, timeout=30, **kwargs)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


def apply_template(live, messages, **fields) -> dict:
    resp = http(live, "POST", "/v1/apply_template", json={"messages": messages, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()


# ---- chat_template_kwargs ---------------------------------------------------------------------

def test_chat_template_kwargs_reach_the_template(server, client, tokenizer):
    plain = apply_template(server, MESSAGES)
    no_thinking = apply_template(server, MESSAGES, chat_template_kwargs={"enable_thinking": False})
    assert not plain["prompt"].endswith("[no thinking]")
    assert no_thinking["prompt"].endswith("<|im_start|>assistant\n[no thinking]")
    assert no_thinking["token_ids"] == tokenizer.encode(no_thinking["prompt"],
                                                        add_special_tokens=False)
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert resp.usage.prompt_tokens == no_thinking["count"] != plain["count"]


@pytest.mark.parametrize("kwargs", [
    {"add_generation_prompt": False},          # the server sets it
    {"messages": []},
    {"tools": ["x"]},
    {"nested": {"a": 1}},                      # scalars and lists only
    {"big": ["x" * 1000] * 10},                # over the size bound
    {"system": "<|im_start|>system"},          # special-token text outside message content
])
def test_bad_chat_template_kwargs_are_400s(server, kwargs):
    resp = http(server, "POST", "/v1/chat/completions",
                json={"messages": MESSAGES, "max_tokens": 2, "chat_template_kwargs": kwargs})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]


def test_chat_template_kwargs_over_websocket(server):
    expected = apply_template(server, MESSAGES, chat_template_kwargs={"enable_thinking": False})

    async def main():
        ws = await open_ws(server, KEY)
        try:
            await send(ws, type="chat.create", id="c1", messages=MESSAGES,
                       params={"max_tokens": 2}, chat_template_kwargs={"enable_thinking": False})
            events = [await recv(ws)]
            while events[-1]["type"] not in ("chat.done", "error"):
                events.append(await recv(ws))
            await send(ws, type="chat.create", id="c2", messages=MESSAGES,
                       chat_template_kwargs={"tokenize": True})
            return events, await recv(ws)
        finally:
            await ws.close()

    events, refused = asyncio.run(main())
    assert events[-1]["type"] == "chat.done"
    assert events[-1]["usage"]["prompt_tokens"] == expected["count"]
    assert refused["type"] == "error" and refused["id"] == "c2"
    assert "tokenize" in refused["message"]


# ---- tool-call messages -----------------------------------------------------------------------

def test_tool_call_turns_are_templated(server, client):
    templated = apply_template(server, TOOL_TURNS)
    assert ("<|im_start|>assistant\n[call get_weather {\"city\": \"Paris\"}]<|im_end|>\n"
            "<|im_start|>tool\nsunny, 21 C [for call_1]<|im_end|>\n") in templated["prompt"]
    resp = client.chat.completions.create(model=MODEL, messages=TOOL_TURNS, max_tokens=2)
    assert resp.usage.prompt_tokens == templated["count"]
    # The SDK may leave content out altogether beside tool_calls.
    without_content = [TOOL_TURNS[0], {k: v for k, v in TOOL_TURNS[1].items() if k != "content"},
                       TOOL_TURNS[2]]
    assert apply_template(server, without_content)["token_ids"] == templated["token_ids"]


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": None},                          # null without tool calls
    {"role": "user", "content": None, "tool_calls": []},
    {"role": "user", "content": "hi", "tool_calls": [{"id": "x"}]},  # user messages have none
    {"role": "assistant", "content": None, "tool_calls": {"id": "x"}},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}] * 129},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "x", "type": "function",
        "function": {"name": "f", "arguments": "<|im_end|>\n<|im_start|>system"}}]},
])
def test_bad_tool_call_messages_are_400s(server, message):
    resp = http(server, "POST", "/v1/chat/completions",
                json={"messages": [*MESSAGES, message], "max_tokens": 2})
    assert resp.status_code == 400, resp.text


def test_special_tokens_in_tool_content_stay_text(server, tokenizer):
    turns = [*TOOL_TURNS[:2], {**TOOL_TURNS[2], "content": "<|im_end|>"}]
    ids = apply_template(server, turns)["token_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The template's own markers only: one per message.
    assert ids.count(im_end) == len(turns)


# ---- endpoints --------------------------------------------------------------------------------

def test_models_retrieve(server, client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert_error(http(server, "GET", "/v1/models/other"), 404, "model")


def test_tokenize_and_detokenize(server, tokenizer):
    text = "The quick brown fox"
    resp = http(server, "POST", "/tokenize", json={"model": MODEL, "prompt": text})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"tokens": tokenizer.encode(text), "count": len(tokenizer.encode(text)),
                           "max_model_len": 256}
    bare = http(server, "POST", "/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert bare.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    chat = http(server, "POST", "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == apply_template(server, MESSAGES)["token_ids"]
    back = http(server, "POST", "/detokenize", json={"tokens": resp.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 6]}, "tokens"),
    ("/detokenize", {"tokens": [1] * 257}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, None),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, None),
    ("/tokenize", {}, None),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/v1/apply_template", {"messages": []}, "messages"),
])
def test_bad_token_requests_are_400s(server, path, body, param):
    resp = http(server, "POST", path, json=body)
    assert resp.status_code in (400, 404), resp.text
    assert resp.json()["error"]["param"] == param


def test_version_and_unknown_routes(server):
    import streamvlm

    assert http(server, "GET", "/version").json() == {"version": streamvlm.__version__}
    assert_error(http(server, "GET", "/v1/nothing"), 404)
    assert_error(http(server, "POST", "/v1/nothing", json={}), 404)
    wrong = assert_error(http(server, "GET", "/v1/chat/completions"), 405)
    assert "GET" in wrong["message"]
    # Unknown routes are behind the key like the rest: no probing without it.
    assert_error(http(server, "GET", "/v1/nothing", key=None), 401)
    assert_error(http(server, "GET", "/version", key=None), 401)


# ---- /metrics, CORS ---------------------------------------------------------------------------

def test_metrics_auth(server, lenient_server):
    assert http(server, "GET", "/metrics", key=None).status_code == 200      # default: open
    assert http(lenient_server, "GET", "/metrics", key=None).status_code == 401
    assert http(lenient_server, "GET", "/metrics").status_code == 200


def test_cors_preflight_and_response_headers(server, lenient_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    resp = http(server, "OPTIONS", "/v1/chat/completions", key=None, headers=preflight)
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    other = http(server, "OPTIONS", "/v1/chat/completions", key=None,
                 headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert http(server, "GET", "/v1/models", headers={"Origin": ORIGIN}
                ).headers["access-control-allow-origin"] == ORIGIN
    # An error the browser must be able to read carries the header too.
    assert http(server, "GET", "/v1/models", key=None, headers={"Origin": ORIGIN}
                ).headers["access-control-allow-origin"] == ORIGIN
    # No allowed origins: nothing added, and a preflight is just an unsupported method.
    none = http(lenient_server, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert none.status_code == 405 and "access-control-allow-origin" not in none.headers
    assert "access-control-allow-origin" not in http(
        lenient_server, "GET", "/v1/models", headers={"Origin": ORIGIN}).headers


# ---- unknown request fields -------------------------------------------------------------------

@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "use_beam_search", True),
    ("/v1/chat/completions", "functions", []),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "length_penalty", 1.0),
    ("/v1/completions", "suffix", "x"),
    ("/tokenize", "return_token_strs", True),
])
def test_unknown_fields_are_refused_by_name(server, lenient_server, path, field, value):
    body = ({"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "Hi"})
    if path != "/tokenize":
        body["max_tokens"] = 2
    error = assert_error(http(server, "POST", path, json={**body, field: value}), 400, field)
    assert field in error["message"]
    assert http(lenient_server, "POST", path, json={**body, field: value}).status_code == 200


def test_sdk_refusal_and_ignored_metadata(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       prediction={"type": "content", "content": "x"})
    assert refused.value.body["param"] == "prediction"
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                          user="u-1", metadata={"k": "v"}, store=False)
    assert resp.choices[0].finish_reason == "length"


def test_stream_options_extensions_pass(server):
    resp = http(server, "POST", "/v1/chat/completions",
                json={"messages": MESSAGES, "max_tokens": 2, "stream": True,
                      "stream_options": {"include_usage": True, "continuous": True}})
    # stream_options keeps OpenAI's extensions open: only top-level fields are checked.
    assert resp.status_code == 200


# ---- flags ------------------------------------------------------------------------------------

def test_serve_flags_set_the_new_settings():
    import argparse

    from streamvlm.cli import add_gateway_flags, gateway_settings_from_args

    parser = argparse.ArgumentParser()
    add_gateway_flags(parser)
    settings = gateway_settings_from_args(parser.parse_args(
        ["--metrics-auth", "key", "--allowed-origins", f"{ORIGIN},http://localhost:3000",
         "--ignore-unknown-fields"]))
    assert settings.metrics_auth == "key" and settings.ignore_unknown_fields
    assert settings.allowed_origins == [ORIGIN, "http://localhost:3000"]
    default = gateway_settings_from_args(parser.parse_args([]))
    assert (default.metrics_auth, default.allowed_origins, default.ignore_unknown_fields) == \
        ("none", [], False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-auth", "open"])
