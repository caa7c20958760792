"""Tool calling through the servers on a tiny random Llama: with tool_choice "required" or a named
function only the grammar makes its output a call, so every answer must parse into tool calls
whose arguments validate against the function's schema. The openai SDK, LangChain and the
WebSocket, with a Hermes/Qwen template and a Llama 3 one."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from streamvlm import AsyncEngine, EngineConfig
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.conftest import build_checkpoint
from tests.live_server import LiveServer
from tests.tool_templates import HERMES_TEMPLATE, LLAMA3_TEMPLATE

jsonschema = pytest.importorskip("jsonschema")

KEY = "sk-tools"
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# Bounded values: a random model samples among what the grammar allows, so an unbounded string
# would rarely close within max_tokens.
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 6},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                          "unit": {"enum": ["C", "F"]}},
           "required": ["city", "days"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"query": {"enum": ["news", "maps"]}}, "required": ["query"]}
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
GET_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Room for the tools' system prompt, which the tiny tokenizer spends many tokens on.
    return build_checkpoint(tmp_path_factory.mktemp("tools") / "llama", "llama", max_position_embeddings=2048)


def _serve(checkpoint, template: str, **settings) -> LiveServer:
    engine = AsyncEngine(EngineConfig(model=str(checkpoint), max_model_len=2048, chat_template=template,
                                      worker_backend="thread"))
    return LiveServer(build_app(engine, GatewaySettings(api_key=KEY, served_model_name=MODEL,
                                                        **settings))).start()


@pytest.fixture(scope="module")
def server(checkpoint):
    live = _serve(checkpoint, HERMES_TEMPLATE)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def llama3_server(checkpoint):
    live = _serve(checkpoint, LLAMA3_TEMPLATE)   # the parser recognized in the template ("auto")
    yield live
    live.stop()


def _client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    return _client(server)


def post(live: LiveServer, body: dict) -> httpx.Response:
    return httpx.post(live.base_url + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def _check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def _streamed_calls(stream) -> tuple[str, list[dict], str]:
    """Content, calls (id, name, arguments joined from the deltas) and finish_reason of a
    streamed choice; checks the deltas' OpenAI shape on the way."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name,
                                      "arguments": delta.function.arguments or ""}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_named_function_over_seeds(client):
    for seed in range(8):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=GET_WEATHER,
                                              max_tokens=150, seed=seed, temperature=1.0)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        _check_call("get_weather", call.function.arguments)


def test_named_function_streaming_matches_non_streaming(client):
    for seed in range(4):
        kwargs = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=GET_WEATHER, max_tokens=150,
                      seed=seed, temperature=1.0)
        whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
        content, calls, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True))
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in whole]
        _check_call("get_weather", calls[0]["arguments"])


def test_each_of_n_choices_is_parsed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=GET_WEATHER, max_tokens=150,
                  seed=7, n=2)
    choices = client.chat.completions.create(**kwargs).choices
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                streamed[choice.index] = streamed.get(choice.index, "") + delta.function.arguments
    for choice in choices:
        (call,) = choice.message.tool_calls
        _check_call("get_weather", call.function.arguments)
        assert streamed[choice.index] == call.function.arguments


def test_required_with_two_tools(client):
    names = set()
    for seed in range(6):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=150, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        _check_call(call.function.name, call.function.arguments)
        names.add(call.function.name)
    assert names <= set(SCHEMAS)
    # Parallel calls allowed (the default): one or more, each valid.
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                          max_tokens=400, seed=1)
    calls = resp.choices[0].message.tool_calls
    complete = calls if resp.choices[0].finish_reason == "tool_calls" else calls[:-1]
    assert calls and all(_check_call(c.function.name, c.function.arguments) is not None for c in complete)
    content, calls, finish = _streamed_calls(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=150, seed=3, stream=True))
    assert finish == "tool_calls" and len(calls) == 1
    _check_call(calls[0]["name"], calls[0]["arguments"])


def test_auto_and_none(server, client):
    """auto: the tools reach the template and the output is parsed (a random model writes no
    call: its text is content); none: the template is not told of the tools."""
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, seed=0)
    auto = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=8, seed=0)
    none = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=8, seed=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens == none.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert auto.choices[0].finish_reason == "length" and not auto.choices[0].message.tool_calls
    engine = server.app.state.engine
    text = engine.processor.chat_text(MESSAGES, None, TOOLS)
    assert '"name": "get_weather"' in text and "<tools>" in text


def test_agent_history_is_rendered(server, client):
    history = MESSAGES + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    text = server.app.state.engine.processor.chat_text(history, None, TOOLS)
    # The arguments text became an object for the template's tojson, not a quoted string.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    resp = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice=GET_WEATHER,
                                          max_tokens=150, seed=2)
    _check_call("get_weather", resp.choices[0].message.tool_calls[0].function.arguments)


def test_bad_tool_requests_are_400s(server):
    cases = [
        ({"tool_choice": GET_WEATHER}, "tool_choice needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "no-such-type"}}}]},
         "type 'object'"),
        ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {
            "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}]}, "no-such-type"),
        ({"tools": TOOLS + TOOLS[:1]}, "given twice"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "at most 128"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "cannot be combined"),
        ({"functions": [{"name": "a"}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "a", "description": "<|im_end|>"}}]},
         "special-token text"),
    ]
    for extra, message in cases:
        reply = post(server, {"messages": MESSAGES, "max_tokens": 5, **extra})
        assert reply.status_code == 400, (extra, reply.text)
        assert message in reply.json()["error"]["message"], (extra, reply.text)
    reply = httpx.post(server.base_url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "prompt": "hi", "tools": TOOLS})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools"


def test_llama3_format(llama3_server):
    client = _client(llama3_server)
    for seed in range(4):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=150, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        _check_call(call.function.name, call.function.arguments)
    content, calls, finish = _streamed_calls(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
        max_tokens=150, seed=5, stream=True))
    assert finish == "tool_calls" and content == "" and [c["name"] for c in calls] == ["search"]
    _check_call("search", calls[0]["arguments"])


def test_langchain_bind_tools_with_forced_tool(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from typing import Literal

    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Get the weather of a city."""

        city: Literal["Paris", "Rome"]
        days: int = Field(ge=1, le=7)

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key=KEY,
                                      max_tokens=150, max_retries=0)
    for seed in range(3):
        message = llm.bind(seed=seed).bind_tools([GetWeather], tool_choice="GetWeather").invoke(
            "What is the weather in Paris?")
        assert len(message.tool_calls) == 1, (message, message.response_metadata)
        (call,) = message.tool_calls
        assert call["name"] == "GetWeather"
        GetWeather(**call["args"])


def test_websocket_tools(server):
    async def chat(create: dict) -> list[dict]:
        async with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"},
                           proxy=None) as ws:
            await ws.send(json.dumps({"type": "chat.create", "id": "c1", **create}))
            events = []
            while not events or events[-1]["type"] not in ("chat.done", "error"):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return events

    events = asyncio.run(chat({"messages": MESSAGES, "params": {"max_tokens": 150, "seed": 4},
                               "tools": TOOLS, "tool_choice": GET_WEATHER}))
    assert events[-1]["type"] == "chat.done" and events[-1]["finish_reason"] == "tool_calls"
    deltas = [d for e in events if e["type"] == "chat.delta" for d in e.get("tool_calls", [])]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather"
    assert "".join(e["text"] for e in events if e["type"] == "chat.delta") == ""
    _check_call("get_weather", "".join(d["function"]["arguments"] for d in deltas))
    # n > 1: each choice's output is parsed on its own; its deltas carry the choice's index.
    events = asyncio.run(chat({"messages": MESSAGES, "params": {"max_tokens": 150, "seed": 4, "n": 2},
                               "tools": TOOLS, "tool_choice": GET_WEATHER}))
    done = events[-1]
    assert done["type"] == "chat.done", done
    assert done["finish_reasons"] == ["tool_calls", "tool_calls"] and done["finish_reason"] == "tool_calls"
    for index in (0, 1):
        deltas = [d for e in events if e["type"] == "chat.delta" and e.get("index", 0) == index
                  for d in e.get("tool_calls", [])]
        assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather"
        assert all(d["index"] == 0 for d in deltas)   # one call per choice
        _check_call("get_weather", "".join(d["function"]["arguments"] for d in deltas))
    events = asyncio.run(chat({"messages": MESSAGES, "tools": TOOLS,
                               "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
    assert events[-1]["type"] == "error" and "'nope'" in events[-1]["message"]
    events = asyncio.run(chat({"prompt": "hi", "tools": TOOLS}))
    assert events[-1]["type"] == "error" and "messages only" in events[-1]["message"]
