"""Matrix-vector product for one-row activations: y = x W^T (+ b), x [1, K], W [N, K].

At batch 1 a decode step reads every weight once and does two flops per byte, so the step time
is the time it takes to stream the weights from HBM. cuBLAS picks split-K kernels with a
separate reduction for these shapes; this kernel reads each weight row once in one pass, with
the whole vector x served from L2, and keeps the weights out of L2 (evict_first) so that the
activations stay there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class GemvConfig(NamedTuple):
    block_n: int     # weight rows per program
    block_k: int     # columns per loop iteration
    num_warps: int


def default_config(n: int, k: int) -> GemvConfig:
    """From `python benchmarks/gemv.py --sweep` on an H200: four rows and 2,048 columns a program
    came within 1% of the best config on every Qwen3-8B shape. Narrower columns where they
    divide K, so that the loads stay unmasked."""
    block_k = next((b for b in (2048, 1024, 512, 256) if k % b == 0), min(2048, triton.next_power_of_2(k)))
    return GemvConfig(block_n=4, block_k=block_k, num_warps=4)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, n_rows, n_cols, stride_w,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the end re-read the last row and are not stored: the loads stay unmasked.
    safe_rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + safe_rows[:, None] * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + start, eviction_policy="evict_first")
            x = tl.load(x_ptr + start + cols, eviction_policy="evict_last")
        else:
            inside = start + cols < n_cols
            w = tl.load(w_ptrs + start, mask=inside[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + start + cols, mask=inside, other=0.0, eviction_policy="evict_last")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + safe_rows).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < n_rows)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x of one row ([1, K] or [K]), weight [N, K] with unit
    column stride; the result has x's leading shape and dtype."""
    k = x.shape[-1]
    n = weight.shape[0]
    assert x.numel() == k and weight.shape[1] == k and weight.stride(1) == 1
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    cfg = config or default_config(n, k)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
    )
    return y
