"""y = x W^T for a few rows (decode batches of 2 to 256 sequences), as S partial sums over slices of K in
float32, for products whose only reader is an RMSNorm (workers/kernels/fused.py rms_norm adds the parts).

The attention output and down projections have N = hidden size (1,024 on Qwen3-0.6B) and K of 2 to 3
times that: cuBLAS covers them with a few dozen output tiles, so most SMs idle while those stream the
weights (about 0.7 TB/s at 128 rows on an H200). Here each slice of K is a program of its own, and summing
the slices costs no kernel: the norm reads S rows of parts instead of one row. The sum runs in a fixed
order, so a row's result depends only on its inputs and the split, never on the other rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from workers.kernels.launch import gdc_launch_dependents, gdc_wait, programmatic_launch

MAX_ROWS = 256


class SplitKConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    splits: int
    num_warps: int
    num_stages: int


def default_config(m: int, n: int, k: int, num_sms: int) -> SplitKConfig | None:
    """The split for an [m, k] x [k, n] product, or None where cuBLAS does better: about one program per SM.
    From a sweep on an H200 (benchmarks/split_k_gemm.py --sweep): the product and the norm after it, at
    Qwen3-0.6B's 1,024 x 2,048 and 1,024 x 3,072, 16 to 256 rows, 4.8-7.1 and 5.5-8.4 us against 7.1-8.6 and
    8.4-9.8 for cuBLAS and the norm; tiles of 32 columns up to 128 rows (64 above, where the input's re-reads
    from L2 weigh more), as many slices as keep the programs within the SMs."""
    if not 2 <= m <= MAX_ROWS:
        return None
    block_m = 16 if m <= 16 else 64
    block_n = 32 if m <= 128 else 64
    block_k = 128
    if n % block_n or k % (2 * block_k):
        return None
    tiles = (n // block_n) * triton.cdiv(m, block_m)
    splits = 1
    while tiles * splits * 2 <= num_sms and k % (splits * 2 * block_k) == 0:
        splits *= 2
    if splits == 1:
        return None
    return SplitKConfig(block_m, block_n, block_k, splits, num_warps=4, num_stages=4)


# The row count changes with the batch: not specialized on, so that a config compiles once.
@triton.jit(do_not_specialize=["m"])
def _split_k_kernel(x_ptr, w_ptr, parts_ptr, m, n, k_slice, stride_x, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (column tile, slice, row tile): parts[slice, rows, cols] = x[rows, slice] @ w[cols, slice]^T."""
    if USE_PDL:
        gdc_launch_dependents()
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * k_slice + tl.arange(0, BLOCK_K)
    row_in = rows < m
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    # The weights are no kernel's output: the first tile is on its way before the wait.
    w = tl.load(w_ptrs)
    if USE_PDL:
        gdc_wait()
    acc = tl.dot(tl.load(x_ptrs, mask=row_in[:, None], other=0.0), tl.trans(w))
    for offset in range(BLOCK_K, k_slice, BLOCK_K):
        w = tl.load(w_ptrs + offset)
        x = tl.load(x_ptrs + offset, mask=row_in[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    parts = parts_ptr + (tl.program_id(1) * m + rows[:, None]).to(tl.int64) * n + cols[None, :]
    tl.store(parts, acc, mask=row_in[:, None])


def split_k_parts(x: torch.Tensor, weight: torch.Tensor, config: SplitKConfig) -> torch.Tensor:
    """float32 [splits, m, n], summing over dim 0 to x @ weight.T, for x [m, k] and weight [n, k] in one
    16-bit dtype with unit stride along k."""
    m, k = x.shape
    n = weight.shape[0]
    c = config
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, weight.shape)
    assert n % c.block_n == 0 and k % (c.splits * c.block_k) == 0, (n, k, c)
    parts = torch.empty(c.splits, m, n, dtype=torch.float32, device=x.device)
    pdl = programmatic_launch(x.device)
    _split_k_kernel[(n // c.block_n, c.splits, triton.cdiv(m, c.block_m))](
        x, weight, parts, m, n, k // c.splits, x.stride(0), weight.stride(0),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, USE_PDL=pdl,
        num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl)
    return parts
