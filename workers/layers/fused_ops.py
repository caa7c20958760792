"""Where the fused Triton kernels (workers/kernels/fused.py) replace the torch code: CUDA tensors,
with triton importable. Elsewhere the layers run their plain torch code."""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch


@functools.cache
def _kernels() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from workers.kernels import fused

    return fused


def fused_kernels(x: torch.Tensor) -> ModuleType | None:
    """The fused-kernel module when x lives on a CUDA device and triton is there, else None."""
    return _kernels() if x.is_cuda else None
