"""Linear layers whose one-row calls (batch-1 decode) on CUDA run the Triton GEMV
(workers/kernels/gemv.py), which streams the weights faster than cuBLAS does at that shape, and
takes the MLP's SiLU-and-mul into the gate/up projection's epilogue. Products of a few rows whose
only reader is an RMSNorm may come back as partial sums over slices of K that the norm adds
(workers/kernels/split_k_gemm.py). Every other call is F.linear."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers.fused_ops import fused_kernels, triton_module

GEMV_DTYPES = (torch.bfloat16, torch.float16)


class PartialSums(NamedTuple):
    """A product x W^T as float32 [S, rows, N] sums over S slices of K, for RMSNorm.add_and_norm to add up."""
    parts: torch.Tensor
    dtype: torch.dtype   # of the product it stands for

    def total(self) -> torch.Tensor:
        return self.parts.sum(0).to(self.dtype)


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() >= 1 and x.numel() == x.shape[-1] > 0 and x.dtype in GEMV_DTYPES
            and weight.dtype == x.dtype and weight.stride(-1) == 1 and triton_module("gemv") is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias)."""
    if uses_gemv(x, weight) and (bias is None or bias.dtype == x.dtype):
        return triton_module("gemv").gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for [gate, up] = linear(x, weight, bias) along the last dim."""
    if uses_gemv(x, weight) and weight.shape[0] % 2 == 0 and (bias is None or bias.dtype == x.dtype):
        return triton_module("gemv").gated_gemv(x, weight, bias)
    gate_up = F.linear(x, weight, bias)
    kernels = fused_kernels(gate_up)
    if kernels is not None and gate_up.dim() == 2:
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_for_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | PartialSums:
    """linear(x, weight) for a product only an RMSNorm's add_and_norm reads: on CUDA, for 2 to 256 rows,
    the partial sums that the norm adds."""
    module = triton_module("split_k_gemm")
    config = (module.default_config(x.shape[0], *weight.shape,
                                    triton_module("launch").multiprocessors(x.device.index or 0))
              if module is not None and x.is_cuda and x.dim() == 2 and x.dtype in GEMV_DTYPES
              and weight.dtype == x.dtype and weight.stride(-1) == 1 else None)
    if config is None:
        return linear(x, weight)
    return PartialSums(module.split_k_parts(x.contiguous(), weight, config), x.dtype)


class Linear(nn.Linear):
    """nn.Linear through linear()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GatedLinear(nn.Linear):
    """[gate, up] = x W^T + b, returned as silu(gate) * up (the MLP's gate and up projections)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_linear(x, self.weight, self.bias)
