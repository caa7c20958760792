"""The split-K product whose parts the next RMSNorm adds (workers/kernels/split_k_gemm.py), on CUDA in
bfloat16, against cuBLAS and the unsplit norm; and the decoder layer path that uses it."""

from __future__ import annotations

import pytest
import torch

from tests.graph_replay import replayed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("m", [2, 16, 100, 256])
@pytest.mark.parametrize("n,k", [(1024, 2048), (1024, 3072)])
def test_parts_add_up_to_the_product(m, n, k):
    from workers.kernels.fused import rms_norm, rms_norm_of_parts
    from workers.kernels.launch import multiprocessors
    from workers.kernels.split_k_gemm import default_config, split_k_parts

    torch.manual_seed(m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    config = default_config(m, n, k, multiprocessors(0))
    assert config is not None and config.splits > 1
    parts = split_k_parts(x, weight, config)
    exact = x.float() @ weight.float().T
    assert (parts.sum(0) - exact).abs().max().item() < 1e-3
    out, summed = rms_norm_of_parts(parts, norm_weight, 1e-6, residual)
    expected_out, expected_summed = rms_norm(exact.to(torch.bfloat16), norm_weight, 1e-6, residual)
    # The product rounds to bfloat16 once either way; its float32 sums may differ in the last bits.
    assert (summed.float() - expected_summed.float()).abs().max().item() <= 0.0625
    assert (out.float() - expected_out.float()).abs().max().item() <= 0.0625
    assert (summed.float() - (exact + residual.float())).abs().max().item() <= 0.0625


def test_parts_and_norm_replay_in_a_cuda_graph():
    """The product and the norm launched with programmatic dependent launch behind a kernel that writes the
    input, captured and replayed: the bits of eager launches."""
    from workers.kernels.fused import rms_norm_of_parts, silu_and_mul
    from workers.kernels.launch import multiprocessors
    from workers.kernels.split_k_gemm import default_config, split_k_parts

    torch.manual_seed(0)
    m, n, k = 64, 1024, 3072
    gate_up = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    config = default_config(m, n, k, multiprocessors(0))

    def step():
        return rms_norm_of_parts(split_k_parts(silu_and_mul(gate_up), weight, config), norm_weight, 1e-6, residual)

    eager = step()
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed(step)))


def test_linear_for_norm_matches_the_plain_layer_path():
    """linear_for_norm + add_and_norm against linear + add_and_norm, on the MLP's SiLU-and-mul output."""
    from workers.kernels.fused import silu_and_mul
    from workers.layers.linear import PartialSums, linear, linear_for_norm
    from workers.layers.norm import RMSNorm

    torch.manual_seed(1)
    m, n, k = 48, 1024, 3072
    hidden = silu_and_mul(torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16))
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    norm = RMSNorm(n, 1e-6).to("cuda", torch.bfloat16)
    parts = linear_for_norm(hidden, weight)
    assert isinstance(parts, PartialSums)
    out, summed = norm.add_and_norm(parts, residual)
    expected_out, expected_summed = norm.add_and_norm(linear(hidden, weight), residual)
    assert (summed.float() - expected_summed.float()).abs().max().item() <= 0.0625
    assert (out.float() - expected_out.float()).abs().max().item() <= 0.0625
    assert torch.equal(parts.total(), parts.parts.sum(0).to(torch.bfloat16))
    assert not isinstance(linear_for_norm(hidden[:1], weight), PartialSums)   # the GEMV
