"""Images through the HTTP and WebSocket gateway, on a real server over a tiny random
Qwen2.5-VL checkpoint, against the offline LLM on the same checkpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from streamvlm import AsyncEngine, EngineConfig, SamplingParams
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.helpers import local_llm
from tests.live_server import LiveServer
from tests.test_ws import Chats, check_stream, create, open_ws, recv, send, slow_worker, \
    wait_engine_idle

KEY = "sk-vlm-test"
MODEL = "tiny-vl"
MAX_TOKENS = 16
MAX_IMAGES = 2
OPTIONS = dict(max_model_len=512, block_size=8, max_images_per_request=MAX_IMAGES)


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")   # lossless: the server decodes the very same pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CAT = random_image(1, (64, 48))
DOG = random_image(2, (40, 72))
TEXT = "Describe the picture."
UNDECODABLE = "data:image/png;base64," + base64.b64encode(b"not an image").decode()


def url_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def openai_messages(*urls: str, text: str = TEXT) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*(url_part(u) for u in urls),
                                         {"type": "text", "text": text}]}]


def offline_messages(*images: Image.Image, text: str = TEXT) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint

    return build_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("gateway_vlm") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def server(checkpoint):
    engine = AsyncEngine(EngineConfig(model=str(checkpoint), worker_backend="thread", **OPTIONS))
    settings = GatewaySettings(api_key=KEY, served_model_name=MODEL)
    live = LiveServer(build_app(engine, settings)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    llm = local_llm(checkpoint, **OPTIONS)
    yield llm
    llm.shutdown()


def offline(reference, messages, max_tokens: int = MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=True)
    return reference.chat(messages, params)[0]


def http(server, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.request(method, server.base_url + path, headers=headers,
                         timeout=kwargs.pop("timeout", 30), **kwargs)


# ---- HTTP -------------------------------------------------------------------------------------

def test_chat_with_image_matches_offline(server, client, reference):
    expected = offline(reference, offline_messages(CAT))
    assert expected.finish_reason == "length" and len(expected.token_ids) == MAX_TOKENS
    assert expected.text   # something to compare
    resp = client.chat.completions.create(
        model=MODEL, messages=openai_messages(data_url(CAT)), temperature=0,
        max_tokens=MAX_TOKENS, logprobs=True, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == "length"
    # The image's placeholders count in the prompt, as offline.
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == MAX_TOKENS
    # Token by token (the logprobs carry each token's text) and with the same logprobs.
    tokenizer = reference.tokenizer
    content = choice.logprobs.content
    assert [e.token for e in content] == [tokenizer.decode([t]) for t in expected.token_ids]
    assert [e.logprob for e in content] == pytest.approx(
        [lp.logprob for lp in expected.logprobs], abs=1e-4)
    # Raw JSON, two images, ignore_eos as a top-level field.
    two = offline(reference, offline_messages(DOG, CAT, text="Compare them."))
    raw = http(server, "POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": openai_messages(data_url(DOG), data_url(CAT),
                                                    text="Compare them."),
        "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["choices"][0]["message"]["content"] == two.text
    assert body["usage"]["prompt_tokens"] == len(two.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == MAX_TOKENS


def test_apply_template_expands_image_placeholders(server, reference):
    expected = offline(reference, offline_messages(CAT, DOG), max_tokens=1)
    resp = http(server, "POST", "/v1/apply_template",
                json={"model": MODEL, "messages": openai_messages(data_url(CAT), data_url(DOG))})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    # The ids the model would be given, each image's placeholder expanded to its token count;
    # the text shows the template's placeholder once per image.
    assert body["token_ids"] == expected.prompt_token_ids and body["count"] == len(body["token_ids"])
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    assert body["prompt"].count(placeholder) == 2 and TEXT in body["prompt"]
    tokens = http(server, "POST", "/tokenize",
                  json={"messages": openai_messages(data_url(CAT), data_url(DOG))}).json()
    assert tokens["tokens"] == body["token_ids"]
    bad = http(server, "POST", "/v1/apply_template", json={"messages": openai_messages(UNDECODABLE)})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_streaming_chat_with_image(server, client, reference):
    expected = offline(reference, offline_messages(DOG))
    kwargs = dict(model=MODEL, messages=openai_messages(data_url(DOG)), temperature=0,
                  max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.parametrize("urls, needles", [
    ([UNDECODABLE], ["cannot decode image"]),
    (["http://example.com/cat.png"], ["remote image URLs are disabled", "allow_remote_images"]),
    ([data_url(CAT)] * (MAX_IMAGES + 1),
     [f"too many images: {MAX_IMAGES + 1}", f"max_images_per_request={MAX_IMAGES}"]),
], ids=["undecodable", "remote_url", "too_many"])
def test_bad_images_get_openai_errors(server, client, urls, needles):
    resp = http(server, "POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": openai_messages(*urls), "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    for needle in needles:
        assert needle in error["message"], error
    # Through the SDK too: a BadRequestError with the same message.
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=openai_messages(*urls),
                                       max_tokens=4)
    assert needles[0] in str(raised.value)
    # The server keeps serving, images included.
    ok = client.chat.completions.create(model=MODEL, messages=openai_messages(data_url(CAT)),
                                        max_tokens=2, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 2
    wait_engine_idle(server)


@contextlib.contextmanager
def failing_encoder(server):
    """The (thread) worker's vision encoder raises: the request fails inside the worker."""
    model = server.app.state.engine.groups[0].local_worker.runner.model

    def encode(items):
        raise RuntimeError("the vision tower broke")

    model.encode = encode
    try:
        yield
    finally:
        del model.encode


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_worker_side_failure_is_an_error_not_a_stop(server, client, stream):
    image = random_image(77 + stream, (40, 40))   # not in the encoder cache
    body = {"model": MODEL, "messages": openai_messages(data_url(image)), "max_tokens": 4,
            "stream": stream}
    with failing_encoder(server):
        resp = http(server, "POST", "/v1/chat/completions", json=body)
    if stream:
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert all("finish_reason" not in e or json.loads(e)["choices"][0]["finish_reason"] is None
                   for e in events[:-2])
    else:
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error"
    assert "cannot encode image" in error["message"] and "the vision tower broke" in error["message"]
    ok = client.chat.completions.create(model=MODEL, messages=openai_messages(data_url(image)),
                                        max_tokens=2, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 2
    wait_engine_idle(server)


# ---- WebSocket --------------------------------------------------------------------------------

def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_ws_chat_with_image(server, reference):
    expected = offline(reference, offline_messages(CAT, text="What is it?"), 24)

    async def main():
        async with await open_ws(server, key=KEY) as ws:
            await send(ws, **create("img", openai_messages(data_url(CAT), text="What is it?"),
                                    temperature=0, max_tokens=24, ignore_eos=True))
            chats = Chats()
            await chats.until_done(ws, "img")
            return chats

    chats = run(main())
    assert chats.events["img"][0]["type"] == "chat.created"
    assert chats.deltas("img")
    check_stream(chats, "img", expected)
    wait_engine_idle(server)


def test_ws_bad_image_fails_only_its_chat(server, reference):
    expected = offline(reference, offline_messages(DOG, text="Go on."), 48)

    async def main():
        async with await open_ws(server, key=KEY) as ws:
            await send(ws, **create("good", openai_messages(data_url(DOG), text="Go on."),
                                    temperature=0, max_tokens=48, ignore_eos=True))
            chats = Chats()
            await chats.until(ws, lambda c: c.deltas("good"))
            await send(ws, **create("bad", openai_messages(UNDECODABLE)))
            error = None
            while error is None or not chats.done("good"):
                event = await recv(ws)
                if event["type"] == "error":
                    assert error is None, event
                    error = event
                    running = chats.done("good") is None
                else:
                    chats.add(event)
            return chats, error, running

    with slow_worker(server, 0.01):   # the good chat surely still runs when the bad one fails
        chats, error, running = run(main())
    assert error["id"] == "bad" and error["code"] == "invalid_request"
    assert "cannot decode image" in error["message"]
    assert running
    assert "bad" not in chats.events      # no chat.created for the refused chat
    check_stream(chats, "good", expected)
    wait_engine_idle(server)
