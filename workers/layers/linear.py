"""Linear layers whose one-row calls (batch-1 decode) on CUDA run the Triton GEMV
(workers/kernels/gemv.py), which streams the weights faster than cuBLAS does at that shape.
Every other call is F.linear."""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

GEMV_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _gemv_module() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from workers.kernels import gemv

    return gemv


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() >= 1 and x.numel() == x.shape[-1] > 0 and x.dtype in GEMV_DTYPES
            and weight.dtype == x.dtype and weight.stride(-1) == 1 and _gemv_module() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias)."""
    if uses_gemv(x, weight) and (bias is None or bias.dtype == x.dtype):
        return _gemv_module().gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through linear()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
