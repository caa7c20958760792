"""On CUDA: the Triton paged-attention kernels and backend against a float32 reference.

Fresh random inputs per case; slots that no sequence owns hold NaN, so that any read outside a sequence's own
positions shows up. Run: python -m pytest -q tests/gpu/test_triton_kernels.py (writes a decode timing report
to $OUT when set).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import pytest
import torch

from benchmarks.common import milliseconds_per_call
from tests.test_triton_interpret import (
    PagedBatch,
    make_paged_batch,
    max_abs_diff,
    reference_attention,
    store_reference,
)
from workers.layers.attention_torch import TorchAttentionBackend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs CUDA and triton")

DEVICE = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
NUM_KV_HEADS = 2
# (head_dim, query heads per kv head, block size)
SHAPES = [(64, 1, 16), (128, 4, 16), (128, 8, 32), (256, 4, 64), (128, 1, 64), (64, 8, 32), (256, 8, 16),
          (80, 4, 16), (96, 2, 32)]
# float32 (a debugging dtype) on a few shapes only: every (dtype, shape) compiles its own kernels.
DTYPE_SHAPES = ([(torch.bfloat16, shape) for shape in SHAPES] + [(torch.float16, shape) for shape in SHAPES]
                + [(torch.float32, shape) for shape in (SHAPES[0], SHAPES[1], SHAPES[3])])


def _case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        head_dim, queries_per_kv, block_size = value
        return f"d{head_dim}-gqa{queries_per_kv}-bs{block_size}"
    return f"partition{value}"


def _batch(query_lens: list[int], seq_lens: list[int], head_dim: int, queries_per_kv: int, block_size: int,
           dtype: torch.dtype, seed: int = 0, num_kv_heads: int = NUM_KV_HEADS, poison: bool = True) -> PagedBatch:
    return make_paged_batch(query_lens, seq_lens, num_kv_heads * queries_per_kv, num_kv_heads, head_dim,
                            block_size, dtype, device=DEVICE, seed=seed, poison=poison)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (8, 128), (4, 256), (2, 80)])
def test_kv_store(dtype, num_kv_heads, head_dim):
    from workers.kernels.kv_store import store_kv_cache

    batch = make_paged_batch([5, 1, 300], [5, 40, 700], num_kv_heads, num_kv_heads, head_dim, 16, dtype,
                             device=DEVICE, poison=False)
    expected = PagedBatch(batch.q, batch.k, batch.v, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta)
    store_reference(expected)
    slots = torch.cat([batch.meta.slot_mapping, torch.tensor([-1], device=DEVICE)])
    k = torch.cat([batch.k, torch.full_like(batch.k[:1], 7.0)])
    v = torch.cat([batch.v, torch.full_like(batch.v[:1], 7.0)])
    store_kv_cache(k, v, batch.k_cache, batch.v_cache, slots)
    assert torch.equal(batch.k_cache, expected.k_cache)
    assert torch.equal(batch.v_cache, expected.v_cache)


@pytest.mark.parametrize("dtype,shape", DTYPE_SHAPES, ids=_case_id)
@pytest.mark.parametrize("partition_size", [None, 64, 4096], ids=_case_id)   # auto, 40 partitions, no split
def test_decode(dtype, shape, partition_size):
    head_dim, queries_per_kv, block_size = shape
    from workers.kernels.paged_attention import paged_decode_attention, plan_decode_partitions

    seq_lens = [1, 17, 300, 1000, 2500]
    batch = _batch([1] * len(seq_lens), seq_lens, head_dim, queries_per_kv, block_size, dtype)
    store_reference(batch)
    partitions = plan_decode_partitions(len(seq_lens), NUM_KV_HEADS, max(seq_lens), head_dim, 264, partition_size)
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_tables,
                                 torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), batch.scale,
                                 max(seq_lens), partitions=partitions)
    assert max_abs_diff(out, reference_attention(batch)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seq_lens,num_kv_heads,queries_per_kv", [([32768], 8, 4), ([33000, 5, 20000, 9000], 8, 4),
                                                                  ([32768], 2, 8), ([40000], 1, 1)])
def test_long_context_decode(dtype, seq_lens, num_kv_heads, queries_per_kv):
    from workers.kernels.paged_attention import paged_decode_attention

    batch = _batch([1] * len(seq_lens), seq_lens, 128, queries_per_kv, 16, dtype, num_kv_heads=num_kv_heads)
    store_reference(batch)
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_tables,
                                 torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), batch.scale,
                                 max(seq_lens))
    assert max_abs_diff(out, reference_attention(batch)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype,shape", DTYPE_SHAPES, ids=_case_id)
def test_chunked_prefill(dtype, shape):
    """Fresh prompts, chunks after a cached prefix, and decodes, in one varlen batch."""
    head_dim, queries_per_kv, block_size = shape
    from workers.kernels.paged_attention import paged_prefill_attention, plan_prefill

    query_lens = [1, 300, 64, 1, 1000, 2, 37]
    seq_lens = [50, 700, 64, 2000, 3000, 2, 4133]
    batch = _batch(query_lens, seq_lens, head_dim, queries_per_kv, block_size, dtype)
    store_reference(batch)
    cu_seqlens_q = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    launches = plan_prefill(query_lens, queries_per_kv, head_dim, DEVICE)
    out = paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_tables,
                                  torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), cu_seqlens_q,
                                  batch.scale, launches)
    assert max_abs_diff(out, reference_attention(batch)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("query_lens,seq_lens", [([1, 1, 1, 1], [3, 700, 5000, 120]),
                                                 ([1, 513, 1, 77, 1], [900, 513, 20, 2100, 1]),
                                                 ([4096], [4096])])
def test_backend_matches_torch_backend(dtype, query_lens, seq_lens):
    """Store + attend over several layers' calls of one prepared step, against TorchAttentionBackend."""
    from workers.layers.attention_triton import TritonAttentionBackend

    batch = _batch(query_lens, seq_lens, 128, 4, 16, dtype, num_kv_heads=4, poison=False)
    torch_caches = (batch.k_cache.clone(), batch.v_cache.clone())
    torch_backend = TorchAttentionBackend()
    torch_meta = batch.fresh_meta()
    torch_backend.prepare(torch_meta)
    expected = torch_backend.forward(batch.q, batch.k, batch.v, *torch_caches, torch_meta, batch.scale)
    backend = TritonAttentionBackend(DEVICE, max_model_len=max(seq_lens))
    for _step in range(2):   # the second step plans in prepare() for the head shape seen in the first
        meta = batch.fresh_meta()
        backend.prepare(meta)
        for _layer in range(3):
            out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, batch.scale)
            assert max_abs_diff(out, expected) < TOLERANCE[dtype]
    assert torch.equal(batch.k_cache, torch_caches[0]) and torch.equal(batch.v_cache, torch_caches[1])


def test_decode_bandwidth_report():
    """Decode attention of one layer of an 8B-class model (32 query heads, 8 kv heads, head_dim 128, bf16):
    achieved KV-read bandwidth per batch size and context. Reported, not asserted."""
    from workers.kernels.paged_attention import (
        default_decode_programs,
        paged_decode_attention,
        plan_decode_partitions,
    )

    report = []
    for num_seqs, context in [(1, 1024), (1, 4096), (1, 32768), (8, 4096), (32, 2048), (64, 8192)]:
        seq_lens = [context] * num_seqs
        batch = _batch([1] * num_seqs, seq_lens, 128, 4, 16, torch.bfloat16, num_kv_heads=8, poison=False)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        partitions = plan_decode_partitions(num_seqs, 8, context, 128, default_decode_programs(batch.q.device))
        ms = milliseconds_per_call(functools.partial(paged_decode_attention, batch.q, batch.k_cache, batch.v_cache,
                                                     batch.meta.block_tables, seq_lens_t, batch.scale, context,
                                                     partitions=partitions), 50)
        kv_bytes = 2 * num_seqs * context * 8 * 128 * 2
        report.append({"num_seqs": num_seqs, "context": context, "partitions": partitions.num_partitions,
                       "us": round(ms * 1000, 1), "kv_gb_per_s": round(kv_bytes / ms / 1e6, 1)})
        del batch
    print(json.dumps(report))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "triton_decode_bandwidth.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "decode": report}, f, indent=2)
