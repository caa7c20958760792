"""Fused ops of vision towers.

``rotary_qkv``: the packed [N, 3, heads, head_dim] output of a vision block's qkv projection in,
q and k rotated by each row's own angles (the 2-D rotary of Qwen-VL towers) and v, each
[N, heads, head_dim] and contiguous, out, in one kernel where the torch code takes some ten
(float32 casts, rotate_half's cat, products, sums, casts back). The rotation is computed in
float32 and rounded once, as the torch code does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                       stride_row, stride_part, stride_head, stride_angle, num_heads,
                       HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    # cos/sin repeat their first half in the second (cat(angles, angles)): the first half serves both.
    cos = tl.load(cos_ptr + row * stride_angle + cols, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_angle + cols, mask=mask, other=0.0).to(tl.float32)
    src = qkv_ptr + row * stride_row + head * stride_head
    dst = (row * num_heads + head) * (2 * HALF)
    for part in tl.static_range(2):
        x1 = tl.load(src + part * stride_part + cols, mask=mask, other=0.0)
        x2 = tl.load(src + part * stride_part + HALF + cols, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        out_ptr = q_ptr if part == 0 else k_ptr
        tl.store(out_ptr + dst + cols, (a * cos - b * sin).to(x1.dtype), mask=mask)
        tl.store(out_ptr + dst + HALF + cols, (b * cos + a * sin).to(x1.dtype), mask=mask)
    v1 = tl.load(src + 2 * stride_part + cols, mask=mask, other=0.0)
    v2 = tl.load(src + 2 * stride_part + HALF + cols, mask=mask, other=0.0)
    tl.store(v_ptr + dst + cols, v1, mask=mask)
    tl.store(v_ptr + dst + HALF + cols, v2, mask=mask)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [N, 3, heads, head_dim] (last dim contiguous), cos/sin [N, head_dim] float32 with
    equal halves -> rotated q, rotated k, v: each [N, heads, head_dim], contiguous."""
    n, three, num_heads, head_dim = qkv.shape
    assert three == 3 and head_dim % 2 == 0 and qkv.stride(-1) == 1
    assert cos.shape == sin.shape == (n, head_dim) and cos.stride() == sin.stride() and cos.stride(-1) == 1
    q, k, v = (torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    if n == 0:
        return q, k, v
    half = head_dim // 2
    _rotary_qkv_kernel[(n, num_heads)](qkv, cos, sin, q, k, v, qkv.stride(0), qkv.stride(1), qkv.stride(2),
                                       cos.stride(0), num_heads, HALF=half, BLOCK=triton.next_power_of_2(half),
                                       num_warps=1)
    return q, k, v
