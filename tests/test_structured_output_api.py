"""Structured output through the servers: the openai SDK's response_format, vLLM's extras, and
the WebSocket's params, on a tiny random Llama (only the grammar makes its output valid)."""

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
from tests.live_server import LiveServer
from tests.test_structured_output import PERSON

jsonschema = pytest.importorskip("jsonschema")

KEY = "sk-structured"
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Give me a person as JSON."}]


@pytest.fixture(scope="module")
def server(llama_path):
    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=512, worker_backend="thread"))
    live = LiveServer(build_app(engine, GatewaySettings(api_key=KEY, served_model_name=MODEL))).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})


def test_sdk_json_schema_over_seeds(client):
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(8):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, seed=seed,
                                              temperature=1.0, response_format=response_format)
        choice = resp.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_sdk_streaming_json_schema(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, seed=5,
                                            response_format=response_format, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_sdk_json_object(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, seed=1,
                                          response_format={"type": "json_object"})
    text = resp.choices[0].message.content
    assert text.startswith("{")
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_vllm_extras(server, client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, seed=2,
                                          extra_body={"guided_choice": ["yes", "no"]})
    assert resp.choices[0].message.content in ("yes", "no")
    resp = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, seed=3,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3}"}})
    text = resp.choices[0].text
    assert len(text) == 5 and text[:2].isupper() and text[2:].isdigit(), text
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "seed": 4, "guided_json": PERSON}
    reply = post(server, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), PERSON)
    body = {"model": MODEL, "prompt": "List:", "max_tokens": 30, "seed": 4,
            "guided_grammar": 'start: item ("," item)*\nitem: "a" | "b"'}
    reply = post(server, "/v1/completions", body)
    assert reply.status_code == 200, reply.text
    assert set(reply.json()["choices"][0]["text"].split(",")) <= {"a", "b"}


def test_bad_constraints_are_400s(server, client):
    with pytest.raises(openai.BadRequestError, match="no-such-type"):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5,
                                                   "guided_regex": "(ab"})
    assert reply.status_code == 400 and "unclosed group" in reply.json()["error"]["message"]
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5,
                                                   "guided_regex": "a", "response_format": {"type": "json_object"}})
    assert reply.status_code == 400
    assert "guided_regex and response_format" in reply.json()["error"]["message"]
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5,
                                                   "structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert reply.status_code == 400 and "exactly one" in reply.json()["error"]["message"]


def test_websocket_params(server):
    async def chat(params: dict) -> list[dict]:
        async with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"},
                           proxy=None) as ws:
            await ws.send(json.dumps({"type": "chat.create", "id": "c1", "messages": MESSAGES,
                                      "params": params}))
            events = []
            while not events or events[-1]["type"] not in ("chat.done", "error"):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return events

    events = asyncio.run(chat({"max_tokens": 200, "seed": 9, "structured_outputs": {"json": PERSON}}))
    assert events[-1]["type"] == "chat.done" and events[-1]["finish_reason"] == "stop"
    text = "".join(e.get("text", "") for e in events if e["type"] == "chat.delta")
    jsonschema.validate(json.loads(text), PERSON)
    events = asyncio.run(chat({"max_tokens": 5, "structured_outputs": {"json": {"type": "no-such-type"}}}))
    assert events[-1]["type"] == "error" and "no-such-type" in events[-1]["message"]


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from typing import Literal

    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        answer: Literal["yes", "no", "maybe"]
        confidence: int = Field(ge=0, le=10)

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key=KEY,
                                      max_tokens=100, max_retries=0)
    for seed in range(3):
        result = llm.bind(seed=seed).with_structured_output(Verdict, method="json_schema").invoke(
            "Is the sky blue?")
        assert isinstance(result, Verdict)
