"""Which attention backend a config gets: the names, what "auto" resolves to, and the backend
built for a device. The torch backend is imported here; the Triton and FlashAttention backends
only once chosen, since they import optional packages (triton, flash_attn) at load."""

from __future__ import annotations

from typing import get_args

import torch

from streamvlm.contract.config import AttentionBackendName
from workers.layers.attention_base import AttentionBackend
from workers.layers.attention_torch import TorchAttentionBackend


BACKENDS: tuple[str, ...] = get_args(AttentionBackendName)


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def flash_attn_available(device: torch.device) -> bool:
    """FlashAttention 4 (flash_attn.cute) importable, with triton, on a Hopper or newer GPU."""
    import importlib.util

    if device.type != "cuda" or not _triton_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        if importlib.util.find_spec("flash_attn.cute") is None:
            return False
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def resolve_backend_name(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend "auto" stands for: on CUDA, flash_attn (FlashAttention 4 prefill, Triton decode)
    where FA4 is importable, the GPU is Hopper or newer and dtype is 16-bit; else our Triton kernels
    where triton is importable; else (and on CPU) the torch backend. Other names stay as they are."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; available: {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if device.type != "cuda" or not _triton_available():
        return "torch"
    if dtype in (torch.bfloat16, torch.float16) and flash_attn_available(device):
        return "flash_attn"
    return "triton"


def get_attention_backend(name: str, device: torch.device, max_model_len: int,
                          dtype: torch.dtype) -> AttentionBackend:
    """The backend of that name (or the one "auto" resolves to), or a ValueError saying why the
    device cannot run it."""
    name = resolve_backend_name(name, device, dtype)
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device")
    if not _triton_available():
        raise ValueError(f"attention_backend={name!r} needs the triton package")
    if name == "flash_attn":
        if not flash_attn_available(device):
            raise ValueError("attention_backend='flash_attn' needs FlashAttention 4 (pip install flash-attn-4) "
                             "and a GPU of compute capability 9.0 or newer")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"attention_backend='flash_attn' needs bfloat16 or float16, not {dtype}")
        from workers.layers.attention_flash import FlashAttnBackend

        return FlashAttnBackend(device, max_model_len)
    from workers.layers.attention_triton import TritonAttentionBackend

    return TritonAttentionBackend(device, max_model_len)
