"""Which attention backend a config gets, and the errors for backends a device cannot run."""

from __future__ import annotations

import pytest
import torch

from workers.layers import attention
from workers.layers.attention import flash_attn_available, get_attention_backend, resolve_backend_name
from workers.layers.attention_torch import TorchAttentionBackend


def test_auto_on_cpu_is_the_torch_backend():
    backend = get_attention_backend("auto", torch.device("cpu"), 512, torch.float32)
    assert isinstance(backend, TorchAttentionBackend)


@pytest.mark.parametrize("name", ["triton", "flash_attn"])
def test_gpu_backends_on_cpu_are_refused(name):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attention_backend(name, torch.device("cpu"), 512, torch.float32)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="available: auto, torch, triton, flash_attn"):
        get_attention_backend("flash", torch.device("cpu"), 512, torch.float32)


def test_flash_attn_is_not_available_on_cpu():
    assert not flash_attn_available(torch.device("cpu"))


def test_engine_config_refuses_flash_attn_on_cpu(tmp_path):
    from streamvlm import LLM
    from tests.conftest import build_checkpoint

    path = build_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="flash_attn.*needs a CUDA device"):
        LLM(str(path), device="cpu", dtype="float32", attention_backend="flash_attn", max_model_len=128)



@pytest.mark.parametrize("has_triton,has_flash,dtype,expected", [
    (True, True, torch.bfloat16, "flash_attn"),
    (True, True, torch.float16, "flash_attn"),
    (True, True, torch.float32, "triton"),     # FA4 runs 16-bit only
    (True, False, torch.bfloat16, "triton"),
    (False, False, torch.bfloat16, "torch"),
])
def test_auto_on_cuda_prefers_flash_attn_then_triton(monkeypatch, has_triton, has_flash, dtype, expected):
    monkeypatch.setattr(attention, "_triton_available", lambda: has_triton)
    monkeypatch.setattr(attention, "flash_attn_available", lambda device: has_flash)
    assert resolve_backend_name("auto", torch.device("cuda"), dtype) == expected
    assert resolve_backend_name("triton", torch.device("cuda"), dtype) == "triton"


def test_device_settings_resolve_once_for_the_device():
    from streamvlm.contract.config import EngineConfig
    from workers.device_settings import resolve_for_device

    settings = resolve_for_device(EngineConfig(device="cpu"), {}, tp_size=1)
    assert (settings.device, settings.dtype, settings.attention_backend, settings.async_scheduling) == \
        (torch.device("cpu"), torch.float32, "torch", False)
    forced = resolve_for_device(EngineConfig(device="cpu", dtype="bfloat16", async_scheduling=True), {}, 1)
    assert forced.dtype == torch.bfloat16 and forced.async_scheduling is True
