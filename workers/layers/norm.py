from __future__ import annotations

import torch
from torch import nn

from workers.layers.fused_ops import fused_kernels
from workers.layers.linear import PartialSums


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the reference implementations do; one fused
    Triton kernel on CUDA."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = fused_kernels(x)
        if kernels is not None and x.dim() == 2 and x.stride(-1) == 1:
            return kernels.rms_norm(x, self.weight, self.eps)[0]
        return self._torch(x)

    def add_and_norm(self, x: torch.Tensor | PartialSums,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the norm in one pass on CUDA. x may be
        partial sums (linear_for_norm): the norm adds them up."""
        kernels = fused_kernels(residual)
        if isinstance(x, PartialSums):
            if kernels is not None and residual.stride(-1) == 1:
                return kernels.rms_norm_of_parts(x.parts, self.weight, self.eps, residual)
            x = x.total()
        if kernels is not None and x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1:
            out, summed = kernels.rms_norm(x, self.weight, self.eps, residual)
            return out, summed
        summed = residual + x
        return self._torch(summed), summed

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
