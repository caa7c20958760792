"""The one-row Triton GEMV against a float64 reference, and linear()'s choice between it and
cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.graph_replay import replayed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k,bias", [(6144, 4096, False), (4096, 12288, False), (151936, 1024, False),
                                      (1000, 896, True), (37, 100, True), (1, 64, False)])
def test_gemv_matches_reference(dtype, n, k, bias):
    from workers.kernels.gemv import GemvConfig, default_config, gemv

    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    weight = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    expected = _reference(x, weight, b)
    for config in {default_config(n, k), GemvConfig(2, 256, 2), GemvConfig(16, 1024, 8)}:
        y = gemv(x, weight, b, config=config)
        assert y.shape == (1, n) and y.dtype == dtype
        # float32 accumulation, one rounding to the output dtype at the end.
        tolerance = torch.finfo(dtype).eps * expected.abs().max().item() + 1e-4
        assert (y.double() - expected).abs().max().item() <= tolerance, config


@pytest.mark.parametrize("d,k,bias", [(12288, 4096, False), (3072, 1024, False), (4864, 896, True), (50, 70, True)])
def test_gated_gemv_gives_the_bits_of_the_product_then_silu_and_mul(d, k, bias):
    """silu(gate) * up from one kernel: gate and up rounded to bfloat16 as the stored product is, then the
    arithmetic of silu_and_mul. The row sums may add in another order than the plain GEMV's (another tile
    shape): within two units in the last place of the two kernels it replaces."""
    from workers.kernels.fused import silu_and_mul
    from workers.kernels.gemv import gated_gemv, gemv

    torch.manual_seed(d * k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * d, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    b = torch.randn(2 * d, device="cuda", dtype=torch.bfloat16) if bias else None
    y = gated_gemv(x, weight, b)
    assert y.shape == (1, d)
    torch.testing.assert_close(y.float(), silu_and_mul(gemv(x, weight, b)).float(), rtol=2 * 2**-8, atol=1e-3)


def _decoder_chain(x, residual, norm_weight, w_in, w_down, w_qk, head_weight, positions, cos, sin):
    """rms_norm -> gated GEMV -> GEMV -> rms_norm with residual -> GEMV -> q/k norm + rotary: each kernel
    reads what the one before it wrote."""
    from workers.kernels.fused import qk_norm_rope, rms_norm
    from workers.kernels.gemv import gated_gemv, gemv

    h, _ = rms_norm(x, norm_weight, 1e-6)
    mixed = gemv(gated_gemv(h, w_in), w_down)
    h, residual = rms_norm(mixed, norm_weight, 1e-6, residual)
    qk = gemv(h, w_qk).view(1, -1, 128)
    heads = qk.shape[1] // 2
    q, k = qk_norm_rope(qk[:, :heads], qk[:, heads:], positions, cos, sin, head_weight, head_weight, 1e-6)
    return q, k, residual


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_programmatic_launch_chain_matches_plain_launches(monkeypatch, graph):
    """Kernels launched with programmatic dependent launch give the bits of plain launches, in
    dependent chains replayed back to back (a missing wait would read a half-written input)."""
    from workers.kernels import fused, gemv as gemv_mod, launch

    if not launch.programmatic_launch(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    torch.manual_seed(0)
    d, inter = 2048, 6144
    norm_weight = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    w_in = torch.randn(2 * inter, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5
    w_down = torch.randn(d, inter, device="cuda", dtype=torch.bfloat16) * inter ** -0.5
    w_qk = torch.randn(8 * 128, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5
    head_weight = torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5
    cos = torch.rand(64, 128, device="cuda", dtype=torch.float32)
    sin = torch.rand(64, 128, device="cuda", dtype=torch.float32)
    inputs = [(torch.randn(1, d, device="cuda", dtype=torch.bfloat16),
               torch.randn(1, d, device="cuda", dtype=torch.bfloat16),
               torch.tensor([i], device="cuda", dtype=torch.int64)) for i in range(8)]

    def run_all():
        return [_decoder_chain(x, r, norm_weight, w_in, w_down, w_qk, head_weight, p, cos, sin)
                for x, r, p in inputs]

    def flatten(results):
        return [t for outputs in results for t in outputs]

    if graph:
        fast = [t.clone() for t in flatten(replayed(run_all))]
    else:
        fast = flatten(run_all())
    for module in (fused, gemv_mod):
        monkeypatch.setattr(module, "programmatic_launch", lambda device: False)
    plain = flatten(run_all())
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))


def test_linear_takes_gemv_for_one_row_only():
    from workers.layers import linear as linear_mod

    weight = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    one, two = (torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16) for rows in (1, 2))
    assert linear_mod.uses_gemv(one, weight)
    assert not linear_mod.uses_gemv(two, weight)
    assert not linear_mod.uses_gemv(one.float(), weight.float())
    assert not linear_mod.uses_gemv(one, weight.t().contiguous().t())
    for x in (one, two, one[0]):
        y = linear_mod.linear(x, weight)
        assert y.shape == F.linear(x, weight).shape
        torch.testing.assert_close(y.float(), F.linear(x, weight).float(), rtol=2e-2, atol=2e-2)


def test_gemv_replays_in_a_cuda_graph():
    from workers.kernels.gemv import gemv

    weight = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    gemv(x, weight)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, weight)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, gemv(x, weight))
