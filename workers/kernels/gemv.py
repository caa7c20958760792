"""Matrix-vector product for one-row activations: y = x W^T (+ b), x [1, K], W [N, K]; and the MLP's
gated form, silu(gate) * up of [gate, up] = x W^T, in one kernel.

At batch 1 a decode step reads every weight once and does two flops per byte, so the step time
is the time it takes to stream the weights from HBM. cuBLAS picks split-K kernels with a
separate reduction for these shapes; this kernel reads each weight row once in one pass, with
the whole vector x served from L2, and keeps the weights out of L2 (evict_first) so that the
activations stay there.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from workers.kernels.launch import gdc_launch_dependents, gdc_wait, programmatic_launch


class GemvConfig(NamedTuple):
    block_n: int     # weight rows per program
    block_k: int     # columns per loop iteration
    num_warps: int


def _config_from_env() -> GemvConfig | None:
    """STREAMVLM_GEMV_CONFIG="block_n,block_k,num_warps" fixes the config (for tuning runs)."""
    value = os.environ.get("STREAMVLM_GEMV_CONFIG")
    if not value:
        return None
    try:
        block_n, block_k, num_warps = (int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(f"STREAMVLM_GEMV_CONFIG={value!r}: expected block_n,block_k,num_warps") from None
    return GemvConfig(block_n, block_k, num_warps)


_ENV_CONFIG = _config_from_env()


def default_config(n: int, k: int) -> GemvConfig:
    """From `STREAMVLM_DISABLE_PDL=1 python benchmarks/profile_decode.py --batch 1 --gemv-configs ...`
    on an H200 (Qwen3-8B, each GEMV in place in a decode step). Four rows and 1,024 columns a
    program was the best single config, and a square 4096 x 4096 (the attention output) did better
    with sixteen rows and eight warps. Rows at least three times longer than the output is wide (the
    MLP's down projection) take eight rows a program: Qwen3-8B's batch-1 graph step 3.654 ms against
    3.816-3.833 with four. For gated_gemv, n counts the gate and up rows together."""
    if k >= 3 * n:
        block_n, num_warps = 8, 4
    elif n >= 4096 and n * k <= 4096 * 4096:   # fewer rows would leave SMs idle below this
        block_n, num_warps = 16, 8
    else:
        block_n, num_warps = 4, 4
    block_k = next((b for b in (1024, 512, 256) if k % b == 0), min(1024, triton.next_power_of_2(k)))
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=num_warps)


@triton.jit
def _load_x(x_ptr, offsets, inside, EVEN_K: tl.constexpr):
    """A chunk of the vector in float32."""
    if EVEN_K:
        x = tl.load(x_ptr + offsets, eviction_policy="evict_last")
    else:
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0, eviction_policy="evict_last")
    return x.to(tl.float32)


@triton.jit
def _load_w(w_ptrs, start, inside, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs + start, eviction_policy="evict_first")
    return tl.load(w_ptrs + start, mask=inside[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, n_rows, n_cols, stride_w,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the end re-read the last row and are not stored: the loads stay unmasked.
    safe_rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + safe_rows[:, None] * stride_w + cols[None, :]
    # The weights are no other kernel's output: the first tile is on its way before the wait.
    w = _load_w(w_ptrs, 0, cols < n_cols, EVEN_K)
    if USE_PDL:
        gdc_wait()
    acc = w.to(tl.float32) * _load_x(x_ptr, cols, cols < n_cols, EVEN_K)[None, :]
    for start in range(BLOCK_K, n_cols, BLOCK_K):
        inside = start + cols < n_cols
        w = _load_w(w_ptrs, start, inside, EVEN_K)
        acc += w.to(tl.float32) * _load_x(x_ptr, start + cols, inside, EVEN_K)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + safe_rows).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < n_rows)


@triton.jit
def _gated_gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, n_out, n_cols, stride_w,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """y = silu(gate) * up for [gate, up] = x W^T (+ b), W [2 * n_out, K]: a program's BLOCK_N outputs from
    their gate rows and the up rows n_out below. Gate and up are rounded to y's dtype first, as the product
    is stored before silu_and_mul reads it."""
    if USE_PDL:
        gdc_launch_dependents()
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate_rows = tl.minimum(outs, n_out - 1).to(tl.int64)
    up_rows = gate_rows + n_out
    cols = tl.arange(0, BLOCK_K)
    gate_ptrs = w_ptr + gate_rows[:, None] * stride_w + cols[None, :]
    up_ptrs = w_ptr + up_rows[:, None] * stride_w + cols[None, :]
    w_gate = _load_w(gate_ptrs, 0, cols < n_cols, EVEN_K)
    w_up = _load_w(up_ptrs, 0, cols < n_cols, EVEN_K)
    if USE_PDL:
        gdc_wait()
    x = _load_x(x_ptr, cols, cols < n_cols, EVEN_K)[None, :]
    acc_gate = w_gate.to(tl.float32) * x
    acc_up = w_up.to(tl.float32) * x
    for start in range(BLOCK_K, n_cols, BLOCK_K):
        inside = start + cols < n_cols
        w_gate = _load_w(gate_ptrs, start, inside, EVEN_K)
        w_up = _load_w(up_ptrs, start, inside, EVEN_K)
        x = _load_x(x_ptr, start + cols, inside, EVEN_K)[None, :]
        acc_gate += w_gate.to(tl.float32) * x
        acc_up += w_up.to(tl.float32) * x
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    if HAS_BIAS:
        gate += tl.load(bias_ptr + gate_rows).to(tl.float32)
        up += tl.load(bias_ptr + up_rows).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up.to(dtype).to(tl.float32)
    tl.store(y_ptr + outs, y.to(dtype), mask=outs < n_out)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x of one row ([1, K] or [K]), weight [N, K] with unit
    column stride; the result has x's leading shape and dtype."""
    return _launch(_gemv_kernel, x, weight, bias, config, weight.shape[0])


def gated_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               config: GemvConfig | None = None) -> torch.Tensor:
    """silu(gate) * up for [gate, up] = F.linear(x, weight, bias) (weight [2D, K]): D wide, as
    silu_and_mul(gemv(x, weight, bias)) gives it, without the 2D-wide product between them."""
    assert weight.shape[0] % 2 == 0, weight.shape
    return _launch(_gated_gemv_kernel, x, weight, bias, config, weight.shape[0] // 2)


def _launch(kernel, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig | None,
            width: int) -> torch.Tensor:
    n, k = weight.shape
    assert x.numel() == x.shape[-1] == k and weight.stride(1) == 1
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    cfg = config or _ENV_CONFIG or default_config(n, k)
    # A gated program covers block_n weight rows too: half of them gate rows, half up rows.
    block_n = cfg.block_n if width == n else max(1, cfg.block_n // 2)
    pdl = programmatic_launch(x.device)
    kernel[(triton.cdiv(width, block_n),)](
        x, weight, bias if bias is not None else weight, y, width, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
        BLOCK_N=block_n, BLOCK_K=cfg.block_k, USE_PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl,
    )
    return y
