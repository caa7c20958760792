"""Linear layers whose one-row calls (batch-1 decode) on CUDA run the Triton GEMV
(workers/kernels/gemv.py), which streams the weights faster than cuBLAS does at that shape, and
takes the MLP's SiLU-and-mul into the down projection. Every other call is F.linear."""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.fused_ops import fused_kernels

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


def silu_and_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu(gate) * up, weight, bias) for gate_up = [gate, up] along the last dim."""
    if (uses_gemv(gate_up, weight) and gate_up.shape[-1] == 2 * weight.shape[1]
            and (bias is None or bias.dtype == gate_up.dtype)):
        return _gemv_module().gemv(gate_up, weight, bias, silu_and_mul=True)
    kernels = fused_kernels(gate_up)
    if kernels is not None and gate_up.dim() == 2:
        hidden = kernels.silu_and_mul(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
    return linear(hidden, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through linear()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
