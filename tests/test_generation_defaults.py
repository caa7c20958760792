"""The checkpoint's generation_config.json gives the defaults of sampling fields a request
leaves unset (HTTP), `override_generation_config` changes them, `generation_config="none"`
ignores the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamvlm import AsyncEngine, EngineConfig
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.live_server import LiveServer

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture(scope="module")
def greedy_checkpoint(llama_path, tmp_path_factory) -> Path:
    """The tiny llama whose generation_config.json says greedy, 6 new tokens at most."""
    path = tmp_path_factory.mktemp("gencfg") / "llama"
    shutil.copytree(llama_path, path)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config.update(temperature=0.0, top_p=0.9, max_new_tokens=6, do_sample=True)
    config_file.write_text(json.dumps(config))
    return path


def serve(model: Path, **config: Any) -> LiveServer:
    engine = AsyncEngine(EngineConfig(model=str(model), max_model_len=256, worker_backend="thread",
                                      **config))
    return LiveServer(build_app(engine, GatewaySettings())).start()


def chat(server: LiveServer, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                          json={"messages": MESSAGES, "ignore_eos": True, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def text_and_tokens(body: dict[str, Any]) -> tuple[str, int]:
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def server(greedy_checkpoint):
    live = serve(greedy_checkpoint)
    yield live
    live.stop()


def test_unset_fields_take_the_checkpoint_defaults(server):
    assert server.app.state.engine.default_sampling_fields == {
        "temperature": 0.0, "top_p": 0.9, "max_tokens": 6}
    unset = chat(server)
    explicit = chat(server, temperature=0, top_p=0.9, max_tokens=6)
    assert text_and_tokens(unset) == text_and_tokens(explicit)
    assert unset["usage"]["completion_tokens"] == 6
    # The default response shape is unchanged: no new fields.
    assert set(unset) == set(explicit)


def test_fields_a_request_sets_win_over_the_defaults(server):
    longer = chat(server, max_tokens=9)
    assert longer["usage"]["completion_tokens"] == 9
    sampled = [text_and_tokens(chat(server, temperature=1.0, seed=seed))[0] for seed in (1, 2, 3)]
    assert len(set(sampled)) > 1


def test_the_override_changes_and_extends_the_defaults(greedy_checkpoint):
    live = serve(greedy_checkpoint, override_generation_config={"max_new_tokens": 3, "top_k": 5})
    try:
        assert live.app.state.engine.default_sampling_fields == {
            "temperature": 0.0, "top_p": 0.9, "max_tokens": 3, "top_k": 5}
        body = chat(live)
        assert body["usage"]["completion_tokens"] == 3
        assert text_and_tokens(body) == text_and_tokens(chat(live, temperature=0, top_p=0.9,
                                                             top_k=5, max_tokens=3))
    finally:
        live.stop()


def test_none_ignores_the_checkpoint_file(greedy_checkpoint, server):
    live = serve(greedy_checkpoint, generation_config="none")
    try:
        assert live.app.state.engine.default_sampling_fields == {}
        greedy_text = text_and_tokens(chat(server, max_tokens=16))[0]
        texts = [text_and_tokens(chat(live, max_tokens=16, seed=seed))[0] for seed in (1, 2)]
        assert any(text != greedy_text for text in texts)
        # Without max_tokens the rest of the context is the limit again.
        usage = chat(live, temperature=0)["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 256
    finally:
        live.stop()


def test_a_bad_override_is_refused_naming_it():
    with pytest.raises(ValueError, match="override_generation_config.*max_length"):
        EngineConfig(override_generation_config={"max_length": 5})
    with pytest.raises(ValueError, match="override_generation_config.*top_p"):
        EngineConfig(override_generation_config={"top_p": 0})
