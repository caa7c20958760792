"""Tiny random checkpoints, built once per session, loaded by the engine and by transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_tokenizer import build_tiny_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 512
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=2, bos_token_id=None, pad_token_id=0, initializer_range=0.1)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True,
                                                       rope_parameters={"rope_type": "llama3",
                                                                        "rope_theta": 10000.0,
                                                                        "factor": 8.0,
                                                                        "low_freq_factor": 1.0,
                                                                        "high_freq_factor": 4.0,
                                                                        "original_max_position_embeddings": 128})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False,
                                                       rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32,
                                                       rope_parameters={"rope_type": "yarn",
                                                                        "rope_theta": 1e6,
                                                                        "factor": 4.0,
                                                                        "original_max_position_embeddings": 128})),
}


def build_checkpoint(path: Path, arch: str, **overrides) -> Path:
    import transformers

    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(path)
    build_tiny_tokenizer(path)
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loop():
    """A uvloop event loop for a test module's engines (no pytest-asyncio needed)."""
    from streamvlm.engine.loop import new_event_loop

    loop = new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_path(checkpoints) -> Path:
    return checkpoints["llama"]
