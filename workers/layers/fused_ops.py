"""Where the fused Triton kernels (workers/kernels/fused.py) replace the torch code: CUDA tensors,
with triton importable. Elsewhere the layers run their plain torch code."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """workers.kernels.<name>, imported on first use, or None where triton is not importable."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"workers.kernels.{name}")


def fused_kernels(x: torch.Tensor) -> ModuleType | None:
    """The fused-kernel module when x lives on a CUDA device and triton is there, else None."""
    return triton_module("fused") if x.is_cuda else None
