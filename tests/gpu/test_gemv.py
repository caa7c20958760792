"""The one-row Triton GEMV against a float64 reference, and linear()'s choice between it and
cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
