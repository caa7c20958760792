"""The FlashAttention 4 backend (FA4 prefill, Triton decode) against the torch backend on the paged
cache: mixed prefill / decode steps (leading decodes split off to the decode kernel, or none),
chunks over a cached prefix, GQA, several head and block sizes, and decode replayed from a CUDA
graph. Skipped where flash-attn-4 is not installed."""

from __future__ import annotations

import pytest
import torch

from tests.test_triton_interpret import PagedBatch, make_paged_batch, max_abs_diff
from workers.layers.attention import flash_attn_available
from workers.layers.attention_base import AttentionMetadata
from workers.layers.attention_torch import TorchAttentionBackend

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not flash_attn_available(DEVICE),
                                reason="needs CUDA (compute capability 9.0+) and flash-attn-4")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _expected(batch: PagedBatch) -> torch.Tensor:
    caches = (batch.k_cache.clone(), batch.v_cache.clone())
    backend = TorchAttentionBackend()
    meta = batch.fresh_meta()
    backend.prepare(meta)
    return backend.forward(batch.q, batch.k, batch.v, *caches, meta, batch.scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim,queries_per_kv,block_size", [(128, 4, 16), (64, 1, 32), (128, 8, 128),
                                                                (256, 2, 16), (96, 4, 64), (64, 4, 16)])
@pytest.mark.parametrize("query_lens,seq_lens", [([1, 1, 1, 1], [3, 700, 5000, 120]),
                                                 ([1, 513, 1, 77, 1], [900, 513, 20, 2100, 1]),
                                                 ([1, 1, 1, 256, 40, 1], [64, 3000, 17, 1024, 40, 300]),
                                                 ([300], [300])])
def test_backend_matches_torch_backend(dtype, head_dim, queries_per_kv, block_size, query_lens, seq_lens):
    from workers.layers.attention_flash import FlashAttnBackend

    batch = make_paged_batch(query_lens, seq_lens, 2 * queries_per_kv, 2, head_dim, block_size, dtype,
                             device=DEVICE, poison=False)
    expected = _expected(batch)
    backend = FlashAttnBackend(DEVICE, max_model_len=max(seq_lens))
    meta = batch.fresh_meta()
    backend.prepare(meta)
    for _layer in range(2):
        out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, batch.scale)
        assert out.shape == batch.q.shape and out.dtype == dtype
        assert max_abs_diff(out, expected) < TOLERANCE[dtype]


def test_decode_replays_from_a_cuda_graph():
    """Static buffers sized for max_model_len, prepared and captured once, replayed for two different
    batches."""
    from workers.layers.attention_flash import FlashAttnBackend

    dtype, head_dim, block_size, max_model_len, num_seqs = torch.bfloat16, 128, 16, 4096, 4
    max_blocks = max_model_len // block_size
    backend = FlashAttnBackend(DEVICE, max_model_len)
    first = make_paged_batch([1] * num_seqs, [3, 700, 4000, 120], 8, 2, head_dim, block_size, dtype,
                             device=DEVICE, poison=False)
    k_cache = torch.zeros(max_blocks * num_seqs + 2, block_size, 2, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    static = dict(q=torch.zeros_like(first.q), k=torch.zeros_like(first.k), v=torch.zeros_like(first.v),
                  slots=torch.zeros(num_seqs, dtype=torch.int64, device=DEVICE),
                  tables=torch.zeros(num_seqs, max_blocks, dtype=torch.int64, device=DEVICE),
                  seq_lens=torch.ones(num_seqs, dtype=torch.int32, device=DEVICE),
                  seq_order=torch.arange(num_seqs, dtype=torch.int32, device=DEVICE))
    meta = AttentionMetadata([1] * num_seqs, [max_model_len] * num_seqs, static["slots"], static["tables"],
                             block_size)

    def load(batch: PagedBatch) -> None:
        k_cache.zero_()
        v_cache.zero_()
        k_cache[:batch.k_cache.shape[0]].copy_(batch.k_cache)
        v_cache[:batch.v_cache.shape[0]].copy_(batch.v_cache)
        for name, value in (("q", batch.q), ("k", batch.k), ("v", batch.v), ("slots", batch.meta.slot_mapping),
                            ("seq_lens", torch.tensor(batch.meta.seq_lens, dtype=torch.int32)),
                            ("seq_order", torch.tensor(sorted(range(num_seqs), key=lambda i: -batch.meta.seq_lens[i]),
                                                       dtype=torch.int32))):
            static[name].copy_(value)
        static["tables"].zero_()
        static["tables"][:, :batch.meta.block_tables.shape[1]].copy_(batch.meta.block_tables)

    # Prepared once before the capture, as DecodeGraphs does: the replays must read the static
    # buffers themselves, not anything derived from them at preparation time.
    backend.prepare_decode_graph(meta, static["seq_lens"], static["seq_order"])

    def step() -> torch.Tensor:
        return backend.forward(static["q"], static["k"], static["v"], k_cache, v_cache, meta, first.scale)

    load(first)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    second = make_paged_batch([1] * num_seqs, [1000, 17, 64, 2500], 8, 2, head_dim, block_size, dtype,
                              device=DEVICE, seed=1, poison=False)
    for batch in (first, second):
        expected = _expected(batch)
        load(batch)
        graph.replay()
        torch.cuda.synchronize()
        assert max_abs_diff(out, expected) < TOLERANCE[dtype]
