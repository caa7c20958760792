"""Linear layers of a few rows (a decode step of 2 to 256 sequences): y = x @ w.T (+ bias).

At these shapes the product is bound by reading the weights, and cuBLAS's tiles (128 columns of
the output and more) leave most of the device's SMs idle on the small matrices of a small model:
a 4,096 x 1,024 weight makes 32 tiles for 132 SMs. This kernel tiles the output in narrow column
blocks, so that every SM streams its share of the weights, and orders the grid so that the row
tiles of one column block run side by side and read its weights from HBM once (L2 serves the
others).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from workers.kernels.launch import programmatic_launch, start_dependents_and_wait

MAX_ROWS = 256


class SkinnyConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(m: int, n: int, k: int) -> SkinnyConfig:
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    return SkinnyConfig(block_m, 32 if n <= 4096 else 64, 128, 4, 4)


# The row count varies with the batch: not specialized on, so that a kernel compiles once per config.
@triton.jit
def _load_x(x_ptrs, mask, k, SILU_AND_MUL: tl.constexpr):
    """A tile of the input; with SILU_AND_MUL the rows hold [gate, up] and the tile is silu(gate) * up
    rounded to the input's dtype, as silu_and_mul stores it."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if SILU_AND_MUL:
        gate = x.to(tl.float32)
        up = tl.load(x_ptrs + k, mask=mask, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["m"])
def _skinny_gemm_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, m, n, k, stride_x, stride_w, stride_y,
                        HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        USE_PDL: tl.constexpr):
    start_dependents_and_wait(USE_PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_in = rows < m
    col_in = cols < n
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        if EVEN_K:
            x = _load_x(x_ptrs, row_in[:, None], k, SILU_AND_MUL)
            w = tl.load(w_ptrs, mask=col_in[:, None], other=0.0)
        else:
            k_in = (start + ks) < k
            x = _load_x(x_ptrs, row_in[:, None] & k_in[None, :], k, SILU_AND_MUL)
            w = tl.load(w_ptrs, mask=col_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, silu_and_mul: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] of at most MAX_ROWS rows, weight [N, K] with unit stride
    along K, all in one 16-bit dtype. Accumulates in float32. With ``silu_and_mul``, x is [..., 2K] holding
    [gate, up] and the input is silu(gate) * up."""
    n, k = weight.shape
    assert x.shape[-1] == (2 * k if silu_and_mul else k) and weight.stride(1) == 1, \
        (x.shape, weight.shape, weight.stride())
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    assert 0 < m <= MAX_ROWS, m
    assert bias is None or bias.shape == (n,), (bias.shape if bias is not None else None, n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    c = config or default_config(m, n, k)
    pdl = programmatic_launch(x.device)
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n))
    _skinny_gemm_kernel[grid](
        x2, weight, bias if bias is not None else weight, y, m, n, k,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SILU_AND_MUL=silu_and_mul, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        EVEN_K=k % c.block_k == 0, USE_PDL=pdl,
        num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl)
    return y.reshape(*x.shape[:-1], n)
