"""Every ready config in configs/ loads as an EngineConfig (fields and values checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamvlm import EngineConfig
from streamvlm.contract.config import resolve

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    config = EngineConfig.from_toml(path)
    assert config.model.model


def test_prefill_decode_config_has_its_groups():
    config = EngineConfig.from_toml(Path(__file__).resolve().parents[1] / "configs" / "1p1d.toml")
    assert [(g.role, g.devices) for g in config.parallel.groups] == [("prefill", [0]), ("decode", [1])]


def test_flat_names_route_to_their_sections(tmp_path):
    config = EngineConfig(block_size=32, max_num_seqs=8, kv_transport="peer", max_image_size=512,
                          max_pending_requests=7, tensor_parallel_size=2)
    assert config.cache.block_size == 32 and config.scheduler.max_num_seqs == 8
    assert config.parallel.kv_transport == "peer" and config.parallel.tensor_parallel_size == 2
    assert config.image.max_image_size == 512 and config.limits.max_pending_requests == 7
    assert EngineConfig.from_kwargs(block_size="32") == EngineConfig(block_size=32)
    assert config.replace(block_size=64).cache.block_size == 64
    with pytest.raises(TypeError, match="bogus"):
        EngineConfig(bogus=1)
    path = tmp_path / "sections.toml"
    path.write_text("max_num_seqs = 4\n[cache]\nblock_size = 32\n")
    loaded = EngineConfig.from_toml(path, block_size=64)
    assert loaded.scheduler.max_num_seqs == 4 and loaded.cache.block_size == 64


def test_resolve_makes_the_cores_settings_concrete():
    config = EngineConfig(max_num_seqs=8)
    resolved = resolve(config, {"max_position_embeddings": 1024})
    assert resolved.model.max_model_len == 1024 and resolved.parallel.kv_transport == "zmq"
    assert resolved.model.max_cuda_graph_batch_size == 8
    assert resolved.limits.max_prompt_bytes == 16 * 1024
    assert resolved.scheduler.max_num_encoder_tokens == config.scheduler.max_num_batched_tokens
    assert config.parallel.kv_transport == "auto" and config.model.max_model_len is None
    kept = resolve(EngineConfig(max_model_len=100, max_prompt_bytes=10, kv_transport="peer",
                                max_num_encoder_tokens=300),
                   {"max_position_embeddings": 1024})
    assert (kept.model.max_model_len, kept.limits.max_prompt_bytes, kept.parallel.kv_transport,
            kept.scheduler.max_num_encoder_tokens) == (100, 10, "peer", 300)


def test_encoder_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_num_encoder_tokens must be >= 1"):
        EngineConfig(max_num_encoder_tokens=0)
