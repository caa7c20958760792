"""`streamvlm generate` as a user runs it: a subprocess, the stream on stdout, errors on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamvlm import SamplingParams
from tests.helpers import local_llm

OPTIONS = {"max_model_len": 512, "block_size": 8}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint

    return build_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("cli") / "qwen2_5_vl")


def streamvlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamvlm.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_with_an_image_file(vlm, tmp_path):
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = tmp_path / "picture.png"
    image.save(path)
    done = streamvlm("generate", "--model", str(vlm), "--max-model-len", "512", "--block-size", "8",
                     "--image", str(path), "--max-tokens", "12", "--temperature", "0", "--ignore-eos",
                     "What is in the picture?")
    assert done.returncode == 0, done.stderr
    llm = local_llm(vlm, **OPTIONS)
    try:
        messages = [{"role": "user", "content": [{"type": "image", "image": path.read_bytes()},
                                                 {"type": "text", "text": "What is in the picture?"}]}]
        [expected] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        llm.shutdown()
    assert done.stdout.rstrip("\n") == expected.text


def test_generate_with_a_missing_image_says_why(vlm, tmp_path):
    done = streamvlm("generate", "--model", str(vlm), "--max-model-len", "512",
                     "--image", str(tmp_path / "nope.png"), "Describe it.")
    assert done.returncode == 2
    assert "cannot read image" in done.stderr and "nope.png" in done.stderr


def test_input_limit_flags_reach_the_engine_config():
    import argparse

    from streamvlm.cli import add_engine_flags, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    config = engine_config_from_args(parser.parse_args(
        ["--allow-special-tokens-in-content", "--max-stop-strings", "4", "--max-stop-length", "64",
         "--max-prompt-bytes", "1000", "--max-pending-image-pixels", "5000000"]))
    assert config.limits.allow_special_tokens_in_content is True
    assert (config.limits.max_stop_strings, config.limits.max_stop_length, config.limits.max_prompt_bytes,
            config.limits.max_pending_image_pixels) == (4, 64, 1000, 5_000_000)
    default = engine_config_from_args(parser.parse_args([]))
    assert default.limits.allow_special_tokens_in_content is False and default.limits.max_prompt_bytes is None
