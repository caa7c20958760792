"""The fused Triton kernels against the torch code they replace, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within about one unit in the last place of the torch code, which rounds every intermediate to
    the tensor's dtype where the kernels keep float32 until the end."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    eps = torch.finfo(expected.dtype).eps
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=4 * eps, atol=4 * eps * scale)
    if expected.dtype != torch.float32:
        assert (actual == expected).float().mean().item() > 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", [(1, 1024), (7, 4096), (300, 2048), (33, 896)])
def test_rms_norm_and_residual(dtype, rows, dim):
    from workers.layers.norm import RMSNorm

    torch.manual_seed(rows + dim)
    norm = RMSNorm(dim, 1e-6).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim) * 0.5 + 1)
    x = torch.randn(rows, dim, device="cuda", dtype=dtype) * 3
    residual = torch.randn(rows, dim, device="cuda", dtype=dtype)
    with torch.no_grad():
        _assert_matches(norm(x), norm._torch(x))
        out, summed = norm.add_and_norm(x, residual)
        assert torch.equal(summed, residual + x)
        _assert_matches(out, norm._torch(residual + x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,qk_norm", [(32, 8, 128, True), (16, 8, 128, False),
                                                             (8, 2, 64, True), (14, 2, 64, False)])
def test_qk_norm_rope(dtype, heads, kv_heads, head_dim, qk_norm):
    from workers.kernels.fused import qk_norm_rope
    from workers.layers.norm import RMSNorm
    from workers.layers.rotary import RotaryEmbedding

    torch.manual_seed(heads + head_dim)
    rotary = RotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 1e6}, 40960, 40960).to("cuda")
    n = 37
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim)   # strided, as in the model
    positions = torch.randint(0, 40000, (n,), device="cuda")
    q_norm, k_norm = RMSNorm(head_dim, 1e-6).to("cuda", dtype), RMSNorm(head_dim, 1e-6).to("cuda", dtype)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(head_dim) + 0.5)
        k_norm.weight.copy_(torch.rand(head_dim) + 0.5)
        if qk_norm:
            q_ref, k_ref = rotary(positions, q_norm._torch(q), k_norm._torch(k))
            q_out, k_out = qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache,
                                        q_norm.weight, k_norm.weight, 1e-6)
        else:
            q_ref, k_ref = rotary(positions, q, k)
            q_out, k_out = qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    _assert_matches(q_out, q_ref)
    _assert_matches(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("section,interleaved", [([16, 24, 24], False), ([24, 20, 20], True)])
def test_mrope(dtype, section, interleaved):
    """M-RoPE's [3, n] positions (sections or interleaved axes) through the fused kernel, against
    MRotaryEmbedding's torch code (float32, rounded once; the torch code rounds each op)."""
    from workers.kernels.fused import qk_norm_rope
    from workers.layers.mrope import MRotaryEmbedding

    torch.manual_seed(sum(section))
    rotary = MRotaryEmbedding(128, {"rope_type": "default", "rope_theta": 1e6}, 4096, 4096, section,
                              interleaved).to("cuda")
    n, heads, kv_heads = 29, 16, 2
    q = torch.randn(n, heads, 128, device="cuda", dtype=dtype)
    k = torch.randn(n, kv_heads, 128, device="cuda", dtype=dtype)
    positions = torch.randint(0, 4000, (3, n), device="cuda")
    q_ref, k_ref = rotary(positions, q.float(), k.float())
    q_out, k_out = qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache, axis=rotary.axis)
    _assert_matches(q_out, q_ref.to(dtype))
    _assert_matches(k_out, k_ref.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,qk_norm", [(32, 8, 128, 16, True), (14, 2, 64, 32, False),
                                                                        (16, 16, 128, 1, True)])
def test_qk_norm_rope_store_matches_rope_then_store(dtype, heads, kv_heads, head_dim, block_size, qk_norm):
    """The rotary kernel that writes k and v into the paged cache gives the bits of qk_norm_rope
    followed by store_kv_cache; padding tokens (slot -1) write nothing."""
    from workers.kernels.fused import qk_norm_rope, qk_norm_rope_store
    from workers.kernels.kv_store import store_kv_cache
    from workers.layers.rotary import RotaryEmbedding

    torch.manual_seed(heads + block_size)
    rotary = RotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 1e6}, 40960, 40960).to("cuda")
    n, num_blocks = 45, 64
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                            kv_heads * head_dim], dim=-1))
    positions = torch.randint(0, 40000, (n,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:n]
    slots[::7] = -1
    weights = (torch.rand(head_dim, device="cuda", dtype=dtype) + 0.5,
               torch.rand(head_dim, device="cuda", dtype=dtype) + 0.5, 1e-6) if qk_norm else ()
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    q_ref, k_ref = qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache, *weights)
    store_kv_cache(k_ref, v, *expected, slots)
    q_out = qk_norm_rope_store(q, k, v, positions, rotary.cos_cache, rotary.sin_cache, *caches, slots, *weights)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", [(1, 12288), (9, 3072), (257, 1408)])
def test_silu_and_mul(dtype, rows, dim):
    import torch.nn.functional as F

    from workers.kernels.fused import silu_and_mul

    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * dim, device="cuda", dtype=dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    _assert_matches(silu_and_mul(x), F.silu(gate) * up)
