"""The settings a worker group resolves for its own device, once, before it builds anything:
device, dtype, attention backend and async scheduling. The engine core resolves everything else
(``streamvlm.contract.config.resolve``); these depend on the device, which the core cannot see
without initializing CUDA itself, and which a remote group has on another host. Everything in
the worker reads them from here, and the group reports them to the core in ``WorkerReady``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamvlm.contract.config import EngineConfig
from workers.layers.attention import resolve_backend_name
from workers.multimodal import TORCH_DTYPES


@dataclass(frozen=True)
class DeviceSettings:
    device: torch.device
    dtype: torch.dtype
    attention_backend: str      # never "auto"
    async_scheduling: bool


def resolve_device(name: str) -> torch.device:
    """The device "auto" stands for (CUDA where available); also needed on its own by a
    tensor-parallel rank before it joins its group."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, hf_config: dict[str, Any], device: torch.device) -> torch.dtype:
    """"auto": float32 on CPU; on CUDA float16 where the checkpoint declares it, else bfloat16."""
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    declared = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return torch.float16 if declared == "float16" else torch.bfloat16


def resolve_for_device(config: EngineConfig, hf_config: dict[str, Any], tp_size: int) -> DeviceSettings:
    """Every device-dependent "auto"/None of ``config`` made concrete for this worker group
    (``tp_size``: its number of ranks)."""
    model = config.model
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, hf_config, device)
    async_scheduling = config.scheduler.async_scheduling
    if async_scheduling is None:
        async_scheduling = device.type == "cuda" and tp_size == 1 and not model.skip_model_forward
    return DeviceSettings(device=device, dtype=dtype,
                          attention_backend=resolve_backend_name(model.attention_backend, device, dtype),
                          async_scheduling=async_scheduling)
