"""Fused small ops of a decoder layer: RMSNorm (with the residual add), q/k RMSNorm with rotary,
and SiLU-and-mul. One kernel each, where the torch code takes several.

Each kernel computes in float32 and rounds to the output dtype once at the end, where the torch
code rounds every intermediate to 16 bits: results differ from it by at most about one unit in
the last place (and are the more accurate of the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels.launch import programmatic_launch, start_dependents_and_wait


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_r, stride_o, stride_ro, stride_part, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """PARTS > 0: x is float32 [PARTS, rows, n_cols] partial sums (workers/kernels/split_k_gemm.py), added in
    order and rounded to the residual's dtype, as the product they split would have been stored."""
    start_dependents_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if PARTS > 0:
        for part in tl.static_range(1, PARTS):
            x += tl.load(x_ptr + part * stride_part + row * stride_x + cols, mask=mask, other=0.0)
        x = x.to(residual_ptr.dtype.element_ty)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The residual stream is stored in its dtype, as the unfused add does: normalise that value.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * xf * tl.math.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight * norm(x) over the last dim of x [n, d]; with a residual, x + residual first, returned
    as the new residual stream."""
    n, d = x.shape
    out = torch.empty(n, d, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    if n == 0:
        return out, residual_out
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    _launch_rms_norm(x, 0, residual, weight, eps, out, residual_out)
    return out, residual_out


def rms_norm_of_parts(parts: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x, weight, eps, residual) where x = parts.sum(0) (float32 [S, n, d]) rounded to the residual's
    dtype, summed in order."""
    splits, n, d = parts.shape
    assert residual.shape == (n, d) and residual.stride(-1) == 1 and parts.is_contiguous(), \
        (parts.shape, residual.shape)
    out = torch.empty(n, d, dtype=torch.promote_types(weight.dtype, residual.dtype), device=residual.device)
    residual_out = torch.empty_like(residual)
    if n:
        _launch_rms_norm(parts, splits, residual, weight, eps, out, residual_out)
    return out, residual_out


def _launch_rms_norm(x: torch.Tensor, parts: int, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor | None) -> None:
    n, d = out.shape
    block = triton.next_power_of_2(d)
    pdl = programmatic_launch(out.device)
    _rms_norm_kernel[(n,)](
        x, residual if residual is not None else x, weight, out,
        residual_out if residual_out is not None else out,
        x.stride(-2), residual.stride(0) if residual is not None else 0, out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0, x.stride(0) if parts else 0, d, eps,
        HAS_RESIDUAL=residual is not None, PARTS=parts, BLOCK=block, USE_PDL=pdl,
        num_warps=min(16, max(1, block // 256)), launch_pdl=pdl,
    )


# The token count varies from step to step: not specialized on, so that a variant compiles once, at start-up.
@triton.jit(do_not_specialize=["num_tokens"])
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                         positions_ptr, axis_ptr, cos_ptr, sin_ptr, q_weight_ptr, k_weight_ptr, stride_pos_axis,
                         stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token,
                         stride_v_head, stride_cache, stride_kc_block, stride_kc_slot, stride_kc_head,
                         stride_vc_block, stride_vc_slot, stride_vc_head, block_size, eps,
                         num_tokens, num_q_heads, num_kv_heads, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                         TOKENS: tl.constexpr, HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr,
                         MROPE: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (TOKENS tokens, head): q heads first, then k heads, then (STORE_KV) v heads. q goes to a
    contiguous [n, heads, dim]; k too, or with STORE_KV into the paged cache at the token's slot
    (slots < 0 are padding: not written), where v is copied as well. With MROPE, positions are
    [3, n] and frequency i takes its angle from the position on axis[i]."""
    start_dependents_and_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS).to(tl.int64)   # [TOKENS]
    head = tl.program_id(1)
    half = tl.arange(0, HALF)
    is_q = head < num_q_heads
    valid = token < num_tokens
    if STORE_KV:
        slot = tl.load(slot_mapping_ptr + token, mask=valid, other=-1).to(tl.int64)
        block = slot // block_size
        offset = slot % block_size
        valid = valid & (is_q | (slot >= 0))
    mask = valid[:, None] & (half < HALF)[None, :]
    if STORE_KV:
        if head >= num_q_heads + num_kv_heads:
            kv = head - num_q_heads - num_kv_heads
            src = v_ptr + token[:, None] * stride_v_token + kv * stride_v_head + half[None, :]
            dst = (v_cache_ptr + block[:, None] * stride_vc_block + offset[:, None] * stride_vc_slot
                   + kv * stride_vc_head + half[None, :])
            tl.store(dst, tl.load(src, mask=mask), mask=mask)
            tl.store(dst + HALF, tl.load(src + HALF, mask=mask), mask=mask)
            return
    if is_q:
        src = q_ptr + token[:, None] * stride_q_token + head * stride_q_head + half[None, :]
        dst = q_out_ptr + (token[:, None] * num_q_heads + head) * HEAD_DIM + half[None, :]
        w_ptr = q_weight_ptr
    else:
        kv = head - num_q_heads
        src = k_ptr + token[:, None] * stride_k_token + kv * stride_k_head + half[None, :]
        if STORE_KV:
            dst = (k_cache_ptr + block[:, None] * stride_kc_block + offset[:, None] * stride_kc_slot
                   + kv * stride_kc_head + half[None, :])
        else:
            dst = k_out_ptr + (token[:, None] * num_kv_heads + kv) * HEAD_DIM + half[None, :]
        w_ptr = k_weight_ptr
    x1 = tl.load(src, mask=mask)
    x2 = tl.load(src + HALF, mask=mask)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.math.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / HEAD_DIM + eps)
        a1 = tl.load(w_ptr + half).to(tl.float32)[None, :] * a1 * rstd[:, None]
        a2 = tl.load(w_ptr + HALF + half).to(tl.float32)[None, :] * a2 * rstd[:, None]
    if MROPE:
        axis = tl.load(axis_ptr + half).to(tl.int64)
        pos = tl.load(positions_ptr + axis[None, :] * stride_pos_axis + token[:, None], mask=mask, other=0).to(tl.int64)
    else:
        pos = tl.load(positions_ptr + token, mask=valid, other=0).to(tl.int64)[:, None]
    # The cache rows hold [freqs, freqs]: the first half serves both halves of the head.
    cos = tl.load(cos_ptr + pos * stride_cache + half[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache + half[None, :], mask=mask, other=0.0)
    # x * cos + rotate_half(x) * sin
    tl.store(dst, (a1 * cos - a2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF, (a2 * cos + a1 * sin).to(dtype), mask=mask)


# A step of many tokens (prefill) gives each program a tile of this many tokens: one program per
# (token, head), 256 bytes each, spent more time being scheduled than moving data (0.63 ms a layer
# for 16,384 tokens of Qwen3-0.6B on an H200). Decode batches keep one token per program.
QK_TILE_TOKENS = 16
QK_TILE_FROM = 128


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 axis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (full head dim, NeoX halves) over q [n, H, D] and k [n, KV, D] (strided views are fine),
    after a per-head RMSNorm when weights are given. Returns contiguous new tensors.

    positions [n], or M-RoPE's [3, n] with ``axis`` [D // 2] naming each frequency's axis."""
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_out = _launch_qk_norm_rope(q, k, None, positions, cos_cache, sin_cache, q_weight, k_weight, eps,
                                 k_out, None, axis)
    return q_out, k_out


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_cache: torch.Tensor, sin_cache: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_weight: torch.Tensor | None = None,
                       k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       axis: torch.Tensor | None = None) -> torch.Tensor:
    """qk_norm_rope, with the rotated keys and the values v [n, KV, D] written straight into the
    paged caches [num_blocks, block_size, KV, D] at slot_mapping [n] (slots < 0 are skipped), as
    store_kv_cache would: one kernel for both. Returns the rotated q."""
    n, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and v.stride(-1) == 1, (v.shape, k.shape, v.stride())
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, k.shape)
    assert v_cache.shape == k_cache.shape and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.dtype == v_cache.dtype == k.dtype == v.dtype, (k_cache.dtype, k.dtype, v.dtype)
    assert slot_mapping.shape == (n,), (slot_mapping.shape, n)
    return _launch_qk_norm_rope(q, k, v, positions, cos_cache, sin_cache, q_weight, k_weight, eps,
                                None, (k_cache, v_cache, slot_mapping), axis)


def _launch_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor,
                         cos_cache: torch.Tensor, sin_cache: torch.Tensor, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, eps: float, k_out: torch.Tensor | None,
                         caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                         axis: torch.Tensor | None) -> torch.Tensor:
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_cache.stride(-1) == 1
    mrope = positions.dim() == 2
    if mrope:
        assert axis is not None and axis.shape == (head_dim // 2,) and positions.shape == (3, n), (axis, positions.shape)
        assert positions.stride(1) == 1, positions.stride()
    q_out = torch.empty(n, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if n == 0:
        return q_out
    has_norm = q_weight is not None
    store = caches is not None
    k_cache, v_cache, slot_mapping = caches if store else (k_out, k_out, positions)
    v = v if v is not None else k
    pdl = programmatic_launch(q.device)
    tokens = QK_TILE_TOKENS if n >= QK_TILE_FROM else 1
    _qk_norm_rope_kernel[(triton.cdiv(n, tokens), num_q_heads + num_kv_heads * (2 if store else 1))](
        q, k, v, q_out, k_out if k_out is not None else q_out, k_cache, v_cache, slot_mapping,
        positions, axis if mrope else positions, cos_cache, sin_cache, q_weight if has_norm else q,
        k_weight if has_norm else k, positions.stride(0) if mrope else 0, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_cache.stride(0),
        *(k_cache.stride()[:3] if store else (0, 0, 0)), *(v_cache.stride()[:3] if store else (0, 0, 0)),
        k_cache.shape[1] if store else 1, eps, n, num_q_heads, num_kv_heads,
        HEAD_DIM=head_dim, HALF=head_dim // 2, TOKENS=tokens, HAS_NORM=has_norm, STORE_KV=store, MROPE=mrope,
        USE_PDL=pdl, num_warps=1 if tokens == 1 else 4, launch_pdl=pdl,
    )
    return q_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    start_dependents_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = g * tl.sigmoid(g)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :d]) * x[:, d:] for x [n, 2d]."""
    n, two_d = x.shape
    d = two_d // 2
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    assert x.stride(-1) == 1
    block = min(1024, triton.next_power_of_2(d))
    pdl = programmatic_launch(x.device)
    _silu_and_mul_kernel[(n, triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d, BLOCK=block,
                                                     USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
