"""Every ready config in configs/ loads as an EngineConfig (fields and values checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamvlm import EngineConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    config = EngineConfig.from_toml(path)
    assert config.model.model


def test_prefill_decode_config_has_its_groups():
    config = EngineConfig.from_toml(Path(__file__).resolve().parents[1] / "configs" / "1p1d.toml")
    assert [(g.role, g.devices) for g in config.parallel.groups] == [("prefill", [0]), ("decode", [1])]
