"""The Triton kernels under Triton's interpreter on CPU, against a float32 reference (skipped without triton).

Triton picks interpreter mode when kernels are defined, so the checks run in a child process with
TRITON_INTERPRET=1: this process, which may also run the CUDA tests, never defines the kernels interpreted.
The batch builders and the reference are shared with tests/gpu/test_triton_kernels.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from workers.layers.attention_base import AttentionMetadata
from workers.layers.attention_torch import TorchAttentionBackend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PagedBatch:
    """One step: new q/k/v for the query tokens, caches holding every earlier token, and the metadata."""
    q: torch.Tensor           # [num_tokens, num_heads, head_dim]
    k: torch.Tensor           # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    k_cache: torch.Tensor     # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    meta: AttentionMetadata

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def fresh_meta(self) -> AttentionMetadata:
        m = self.meta
        return AttentionMetadata(m.query_lens, m.seq_lens, m.slot_mapping, m.block_tables, m.block_size)


def make_paged_batch(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", seed: int = 0, poison: bool = True) -> PagedBatch:
    """Sequences on shuffled cache blocks (block 0 in use too, as in the engine, where tables are padded with 0).
    poison: slots no sequence owns, and the slots the step's new tokens go to, hold NaN, so that reading
    anything but stored K/V of the right positions shows up in the output."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, slots, used = [], [], []
    for nblocks, seq_len, query_len in zip(blocks_per_seq, seq_lens, query_lens):
        table, order = order[:nblocks], order[nblocks:]
        tables.append(table + [0] * (max(blocks_per_seq) - nblocks))
        for pos in range(seq_len):
            slot = table[pos // block_size] * block_size + pos % block_size
            (slots if pos >= seq_len - query_len else used).append(slot)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
    if poison:
        keep = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
        keep[torch.tensor(used, dtype=torch.long, device=device)] = True
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[~keep] = float("nan")
    num_tokens = sum(query_lens)
    meta = AttentionMetadata(query_lens=list(query_lens), seq_lens=list(seq_lens),
                             slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                             block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
                             block_size=block_size)
    return PagedBatch(randn(num_tokens, num_heads, head_dim), randn(num_tokens, num_kv_heads, head_dim),
                      randn(num_tokens, num_kv_heads, head_dim), k_cache, v_cache, meta)


def store_reference(batch: PagedBatch) -> None:
    """The step's K/V into the caches, as every backend does first."""
    num_kv_heads, head_dim = batch.k_cache.shape[-2:]
    batch.k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.meta.slot_mapping, batch.k)
    batch.v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.meta.slot_mapping, batch.v)


def reference_attention(batch: PagedBatch) -> torch.Tensor:
    """float32 causal attention of each sequence's queries over its cached keys (new K/V already stored)."""
    meta, q = batch.meta, batch.q.float()
    num_heads = q.shape[1]
    num_kv_heads, head_dim = batch.k_cache.shape[-2:]
    flat_k = batch.k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = batch.v_cache.view(-1, num_kv_heads, head_dim)
    out, start = [], 0
    for b, (query_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        positions = torch.arange(seq_len, device=q.device)
        slots = meta.block_tables[b, positions // meta.block_size] * meta.block_size + positions % meta.block_size
        k = flat_k[slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1)   # [seq_len, H, D]
        v = flat_v[slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + query_len], k) * batch.scale
        q_positions = torch.arange(seq_len - query_len, seq_len, device=q.device)
        scores = scores.masked_fill(positions[None, None, :] > q_positions[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += query_len
    return torch.cat(out)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """inf where either holds a NaN the other does not (Python's max() would drop a NaN)."""
    diff = (a.float() - b.float()).abs()
    return diff.nan_to_num(nan=float("inf")).max().item()


# ---------------------------------------------------------------------------------------------------------
# Checks, run in the child process.

def check_kv_store(dtype: torch.dtype) -> float:
    from workers.kernels.kv_store import store_kv_cache

    batch = make_paged_batch([3, 1, 6], [3, 9, 20], 4, 2, 32, 8, dtype=dtype, poison=False)
    expected_k, expected_v = batch.k_cache.clone(), batch.v_cache.clone()
    store_reference(PagedBatch(batch.q, batch.k, batch.v, expected_k, expected_v, batch.meta))
    # A padding token (slot -1) writes nothing.
    slots = torch.cat([batch.meta.slot_mapping, torch.tensor([-1])])
    k = torch.cat([batch.k, torch.full_like(batch.k[:1], 7.0)])
    v = torch.cat([batch.v, torch.full_like(batch.v[:1], 7.0)])
    store_kv_cache(k, v, batch.k_cache, batch.v_cache, slots)
    return max(max_abs_diff(batch.k_cache, expected_k), max_abs_diff(batch.v_cache, expected_v))


def check_qk_norm_rope_store(qk_norm: bool) -> float:
    """The rotary kernel writing k and v into the cache: q as qk_norm_rope gives it, the cache as
    qk_norm_rope's k stored by store_kv_cache; a padding token (slot -1) writes nothing."""
    from workers.kernels.fused import qk_norm_rope, qk_norm_rope_store
    from workers.kernels.kv_store import store_kv_cache
    from workers.layers.rotary import RotaryEmbedding

    batch = make_paged_batch([3, 1, 6], [3, 9, 20], 4, 2, 32, 8, poison=False)
    n, num_heads, num_kv_heads, head_dim = batch.q.shape[0] + 1, 4, 2, 32
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim)
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                                                            num_kv_heads * head_dim], dim=-1))
    slots = torch.cat([batch.meta.slot_mapping, torch.tensor([-1])])
    positions = torch.randint(0, 64, (n,))
    rotary = RotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 1e4}, 64, 64)
    norms = (torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5, 1e-6) if qk_norm else ()
    expected_k, expected_v = batch.k_cache.clone(), batch.v_cache.clone()
    q_ref, k_ref = qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache, *norms)
    store_kv_cache(k_ref, v, expected_k, expected_v, slots)
    q_out = qk_norm_rope_store(q, k, v, positions, rotary.cos_cache, rotary.sin_cache, batch.k_cache,
                               batch.v_cache, slots, *norms)
    return max(max_abs_diff(q_out, q_ref), max_abs_diff(batch.k_cache, expected_k),
               max_abs_diff(batch.v_cache, expected_v))


def check_decode(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 partition_size: int | None = None, dtype: torch.dtype = torch.float32,
                 longest_first: bool = False) -> float:
    from workers.kernels.paged_attention import paged_decode_attention, plan_decode_partitions

    batch = make_paged_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    store_reference(batch)
    partitions = plan_decode_partitions(len(seq_lens), num_kv_heads, max(seq_lens), head_dim, 8, partition_size)
    if partition_size is not None:
        assert partitions.num_partitions > 1, partitions
    order = longest_first_order(seq_lens) if longest_first else None
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_tables,
                                 torch.tensor(seq_lens, dtype=torch.int32), batch.scale, max(seq_lens),
                                 partitions=partitions, seq_order=order)
    return max_abs_diff(out, reference_attention(batch))


def check_scatter_decode_inputs(position_rows: int, with_previous: bool) -> float:
    """The staged inputs of a 3-row bucket (block tables 300 wide: two loop steps) into larger static buffers,
    against plain copies; rows and columns past the bucket keep what they held."""
    from workers.cuda_graphs import DecodeInputBuffers, StagingLayout
    from workers.kernels.decode_inputs import scatter_decode_inputs

    layout = StagingLayout(3, position_rows, 300, 1)
    staged, sources = layout.unpack(torch.randint(0, 1000, (layout.end,), generator=torch.Generator().manual_seed(3)))
    sources.copy_(torch.tensor([-1, 1, -1]))
    previous = torch.tensor([70, 80]) if with_previous else None
    rows, columns = 8, 320

    def static() -> DecodeInputBuffers:
        g = torch.Generator().manual_seed(4)
        return DecodeInputBuffers(torch.randint(0, 9, (rows,), generator=g),
                                  torch.randint(0, 9, (position_rows, rows), generator=g),
                                  torch.randint(0, 9, (rows,), generator=g),
                                  torch.randint(0, 9, (rows,), generator=g, dtype=torch.int32),
                                  torch.randint(0, 9, (rows,), generator=g, dtype=torch.int32),
                                  torch.randint(0, 9, (rows, columns), generator=g))

    expected, got = static(), static()
    expected.input_ids[:3] = staged.input_ids
    if with_previous:
        expected.input_ids[1] = 80
    expected.positions[:, :3] = staged.positions
    expected.slot_mapping[:3] = staged.slot_mapping
    expected.seq_lens[:3] = staged.seq_lens.to(torch.int32)
    expected.seq_order[:3] = staged.seq_order.to(torch.int32)
    expected.block_tables[:3, :300] = staged.block_tables
    scatter_decode_inputs(staged, sources, got, previous)
    return max(max_abs_diff(a, b) for a, b in zip(got, expected))


def longest_first_order(seq_lens: list[int]) -> torch.Tensor:
    return torch.tensor(sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i]), dtype=torch.int32)


def check_backend(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                  block_size: int, partition_size: int | None = None, dtype: torch.dtype = torch.float32,
                  against_torch_backend: bool = False, max_model_len: int | None = None) -> float:
    """TritonAttentionBackend (store + attend) over two layers' calls on one prepared step. max_model_len past
    the longest context: a decode launch covers the step's decode span only."""
    from workers.layers.attention_triton import TritonAttentionBackend

    batch = make_paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                             poison=not against_torch_backend)
    ref_batch = PagedBatch(batch.q, batch.k, batch.v, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta)
    backend = TritonAttentionBackend(torch.device("cpu"), max_model_len or max(seq_lens),
                                     decode_partition_size=partition_size)
    meta = batch.fresh_meta()
    backend.prepare(meta)
    outs = [backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, batch.scale)
            for _ in range(2)]
    if against_torch_backend:
        torch_backend = TorchAttentionBackend()
        ref_meta = batch.fresh_meta()
        torch_backend.prepare(ref_meta)
        expected = torch_backend.forward(batch.q, batch.k, batch.v, ref_batch.k_cache, ref_batch.v_cache,
                                         ref_meta, batch.scale)
    else:
        store_reference(ref_batch)
        expected = reference_attention(ref_batch)
    cache_diff = max(max_abs_diff(batch.k_cache.nan_to_num(), ref_batch.k_cache.nan_to_num()),
                     max_abs_diff(batch.v_cache.nan_to_num(), ref_batch.v_cache.nan_to_num()))   # poison in both
    return max(cache_diff, *(max_abs_diff(out, expected) for out in outs))


def check_gemv(n: int, k: int, bias: bool, block_n: int, block_k: int, gated: bool = False) -> float:
    """The GEMV against F.linear; gated: its SiLU-and-mul form against silu(gate) * up of F.linear."""
    import torch.nn.functional as F

    from workers.kernels.gemv import GemvConfig, gated_gemv, gemv

    torch.manual_seed(n + k)
    x, weight = torch.randn(1, k), torch.randn(2 * n if gated else n, k)
    b = torch.randn(weight.shape[0]) if bias else None
    if not gated:
        return max_abs_diff(gemv(x, weight, b, config=GemvConfig(block_n, block_k, 4)), F.linear(x, weight, b))
    out = gated_gemv(x, weight, b, config=GemvConfig(block_n, block_k, 4))
    gate, up = F.linear(x, weight, b).chunk(2, dim=-1)
    return max_abs_diff(out, F.silu(gate) * up)


def check_split_k(m: int, n: int, k: int, block_m: int, splits: int) -> float:
    """The split-K parts against the product, and the norm that adds them against the unsplit add and norm."""
    from workers.kernels.fused import rms_norm, rms_norm_of_parts
    from workers.kernels.split_k_gemm import SplitKConfig, split_k_parts

    torch.manual_seed(m + n + k)
    x, weight, residual, norm_weight = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n), torch.randn(n)
    parts = split_k_parts(x, weight, SplitKConfig(block_m, 32, 32, splits, 4, 1))
    assert parts.shape == (splits, m, n)
    product = x @ weight.T
    out, summed = rms_norm_of_parts(parts, norm_weight, 1e-6, residual)
    expected_out, expected_summed = rms_norm(product, norm_weight, 1e-6, residual)
    return max(max_abs_diff(parts.sum(0), product), max_abs_diff(summed, expected_summed),
               max_abs_diff(out, expected_out))


def check_vision_rotary(head_dim: int) -> float:
    """The vision towers' fused rotary against the torch code it replaces (float32: the same
    rounding), on a strided qkv view and ragged angles."""
    from workers.kernels.vision import rotary_qkv
    from workers.models.vision_common import apply_rotary_float32

    torch.manual_seed(head_dim)
    n, heads = 11, 3
    qkv = torch.randn(n, 3 * heads * head_dim + 8)[:, 4:4 + 3 * heads * head_dim].view(n, 3, heads, head_dim)
    angles = torch.rand(n, head_dim // 2) * 20
    cos, sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([angles, angles], dim=-1).sin()
    q, k, v = rotary_qkv(qkv, cos, sin)
    return max(max_abs_diff(q, apply_rotary_float32(qkv[:, 0], cos, sin)),
               max_abs_diff(k, apply_rotary_float32(qkv[:, 1], cos, sin)), max_abs_diff(v, qkv[:, 2]))


def check_mrope(interleaved: bool) -> float:
    """The decoder's fused rotary with M-RoPE's [3, n] positions against MRotaryEmbedding."""
    from workers.kernels.fused import qk_norm_rope
    from workers.layers.mrope import MRotaryEmbedding

    torch.manual_seed(3)
    rotary = MRotaryEmbedding(32, {"rope_type": "default", "rope_theta": 1e4}, 256, 256, [6, 5, 5], interleaved)
    n = 9
    q, k = torch.randn(n, 4, 32), torch.randn(n, 2, 32)
    positions = torch.randint(0, 200, (3, n))
    q_ref, k_ref = rotary(positions, q, k)
    q_out, k_out = qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache, axis=rotary.axis)
    return max(max_abs_diff(q_out, q_ref), max_abs_diff(k_out, k_ref))


def check_qk_tiles(qk_norm: bool, mrope: bool) -> float:
    """Steps of many tokens give each program a tile of tokens: the same values as one token per
    program, with and without the norm, M-RoPE and the cache store (a padding slot writes nothing)."""
    from workers.kernels import fused
    from workers.kernels.kv_store import store_kv_cache
    from workers.layers.mrope import MRotaryEmbedding
    from workers.layers.rotary import RotaryEmbedding

    torch.manual_seed(5)
    n, num_heads, num_kv_heads, head_dim = fused.QK_TILE_FROM + 21, 4, 2, 32
    assert n % fused.QK_TILE_TOKENS   # a partial last tile
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim)
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                                                            num_kv_heads * head_dim], dim=-1))
    if mrope:
        rotary = MRotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 1e4}, 256, 256, [6, 5, 5], True)
        positions, axis = torch.randint(0, 200, (3, n)), rotary.axis
    else:
        rotary = RotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 1e4}, 256, 256)
        positions, axis = torch.randint(0, 200, (n,)), None
    norms = (torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5, 1e-6) if qk_norm else (None, None, 1e-6)
    cache_shape = (n // 8 + 2, 8, num_kv_heads, head_dim)
    slots = torch.randperm(cache_shape[0] * 8)[:n]
    slots[7] = -1
    tiled_caches = (torch.zeros(cache_shape), torch.zeros(cache_shape))
    q_tiled, k_tiled = fused.qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache, *norms, axis=axis)
    q_tiled_store = fused.qk_norm_rope_store(q, k, v, positions, rotary.cos_cache, rotary.sin_cache, *tiled_caches,
                                             slots, *norms, axis=axis)
    tile_from, fused.QK_TILE_FROM = fused.QK_TILE_FROM, n + 1   # one token per program
    try:
        q_one, k_one = fused.qk_norm_rope(q, k, positions, rotary.cos_cache, rotary.sin_cache, *norms, axis=axis)
    finally:
        fused.QK_TILE_FROM = tile_from
    expected_caches = (torch.zeros(cache_shape), torch.zeros(cache_shape))
    store_kv_cache(k_one, v, *expected_caches, slots)
    return max(max_abs_diff(q_tiled, q_one), max_abs_diff(k_tiled, k_one), max_abs_diff(q_tiled_store, q_one),
               max_abs_diff(tiled_caches[0], expected_caches[0]), max_abs_diff(tiled_caches[1], expected_caches[1]))


def check_gumbel_argmax_greedy() -> float:
    """Greedy rows: torch's argmax (lowest column on a tie) at every split, over bfloat16 rows with a
    stride, a row of equal values and a row of -inf; returns the number of rows that differ."""
    from workers.kernels.sampling import TILE, gumbel_argmax

    vocab = 2 * TILE + 37
    logits = torch.randn(6, vocab + 5, generator=torch.Generator().manual_seed(3))
    logits[1] = 0.5
    logits[2, 7] = logits[2, TILE + 9] = logits[2, 2 * TILE + 3] = 9.0   # a three-way tie across tiles
    logits[3] = float("-inf")
    logits[4, vocab - 1] = 50.0                                             # the last column of a partial tile
    strided = logits.to(torch.bfloat16)[:, :vocab]
    expected = strided.float().argmax(-1)
    differ = 0
    for splits in (1, 2, 3):
        differ += int((gumbel_argmax(strided, splits=splits) != expected).sum())
        inv = torch.zeros(6)   # the sampled kernel with every row greedy
        differ += int((gumbel_argmax(strided, inv, torch.arange(6), splits=splits) != expected).sum())
    return float(differ)


def check_gumbel_argmax_draws() -> float:
    """Sampled rows: a draw depends only on (seed, logits), not on the split or the rows beside it,
    and the draws follow softmax(logits / temperature). Returns the largest gap between a token's
    frequency and its probability, or 1.0 if a draw changed with the batch."""
    from workers.kernels.sampling import gumbel_argmax

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, -2.0, 1.5, 0.2])
    n, temperature = 600, 0.7
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    inv = torch.full((n,), 1 / temperature)
    ids = gumbel_argmax(logits.repeat(n, 1), inv, seeds)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:40]
    again = gumbel_argmax(logits.repeat(40, 1), inv[shuffled], seeds[shuffled], splits=1)
    if not torch.equal(again, ids[shuffled]):
        return 1.0
    counts = torch.bincount(ids, minlength=8).float() / n
    return float((counts - torch.softmax(logits / temperature, -1)).abs().max())


CASES = {
    "gumbel_argmax_greedy": check_gumbel_argmax_greedy,
    "gumbel_argmax_draws": check_gumbel_argmax_draws,
    "qk_tiles_norm": lambda: check_qk_tiles(qk_norm=True, mrope=False),
    "qk_tiles_no_norm_mrope": lambda: check_qk_tiles(qk_norm=False, mrope=True),
    "mrope_sections": lambda: check_mrope(False),
    "mrope_interleaved": lambda: check_mrope(True),
    "vision_rotary_dim80": lambda: check_vision_rotary(80),
    "vision_rotary_dim64": lambda: check_vision_rotary(64),
    "gemv_even": lambda: check_gemv(64, 256, False, 8, 128),
    "gemv_ragged_rows_and_cols_bias": lambda: check_gemv(37, 100, True, 8, 64),
    "gemv_gated": lambda: check_gemv(48, 96, False, 4, 32, gated=True),
    "gemv_gated_ragged_bias": lambda: check_gemv(21, 70, True, 8, 64, gated=True),
    "split_k_rows_in_one_tile": lambda: check_split_k(5, 64, 256, 16, 4),
    "split_k_ragged_row_tiles": lambda: check_split_k(37, 96, 128, 16, 2),
    "kv_store": lambda: check_kv_store(torch.float32),
    "kv_store_bf16": lambda: check_kv_store(torch.bfloat16),
    "qk_norm_rope_store": lambda: check_qk_norm_rope_store(qk_norm=True),
    "qk_rope_store_no_norm": lambda: check_qk_norm_rope_store(qk_norm=False),
    "decode_gqa1_bs8": lambda: check_decode([5, 17, 40], 4, 4, 32, 8),
    "decode_gqa2_bs16": lambda: check_decode([1, 16, 33], 4, 2, 64, 16),
    "decode_gqa4_bs8_split": lambda: check_decode([150, 7, 300, 64], 8, 2, 64, 8, partition_size=64),
    "decode_gqa4_bs16_split_dim80": lambda: check_decode([130, 200], 8, 2, 80, 16, partition_size=64),
    "decode_longest_first": lambda: check_decode([5, 170, 40, 90], 4, 2, 32, 8, longest_first=True),
    "decode_longest_first_split": lambda: check_decode([150, 7, 300, 64], 8, 2, 64, 8, partition_size=64,
                                                       longest_first=True),
    "decode_one_tile_partitions": lambda: check_decode([150, 7, 300, 64, 33], 8, 2, 64, 8, partition_size=32),
    "decode_one_tile_partitions_ordered": lambda: check_decode([31, 96, 1, 65], 4, 2, 32, 16, partition_size=32,
                                                               longest_first=True),
    "decode_merge_in_chunks": lambda: check_decode([300, 40], 8, 2, 128, 16, partition_size=32),   # 10 > 8 a chunk
    "decode_fp16": lambda: check_decode([20, 70], 4, 2, 32, 16, dtype=torch.float16),
    "scatter_decode_inputs": lambda: check_scatter_decode_inputs(1, with_previous=True),
    "scatter_decode_inputs_mrope_no_previous": lambda: check_scatter_decode_inputs(3, with_previous=False),
    "backend_decode_split": lambda: check_backend([1, 1, 1], [9, 140, 200], 4, 1, 32, 16, partition_size=64),
    "backend_decode_span": lambda: check_backend([1, 1, 1], [9, 140, 200], 4, 1, 32, 16, partition_size=64,
                                                 max_model_len=4096),
    "backend_decode_span_past_min": lambda: check_backend([1, 1], [600, 40], 4, 2, 32, 16, partition_size=64,
                                                          max_model_len=4096),
    "backend_decode_one_tile": lambda: check_backend([1, 1], [33, 100], 8, 2, 64, 16, partition_size=32),
    "backend_mixed_gqa1_bs8": lambda: check_backend([7, 1, 20, 1], [7, 30, 45, 3], 2, 2, 32, 8),
    "backend_mixed_gqa2_bs16": lambda: check_backend([40, 1, 3, 17], [90, 64, 3, 17], 4, 2, 32, 16),
    "backend_mixed_gqa4_bs8": lambda: check_backend([1, 50, 2], [40, 75, 2], 8, 2, 64, 8),
    "backend_mixed_gqa7_dim80": lambda: check_backend([5, 1, 30], [12, 20, 30], 14, 2, 80, 16),
    "backend_mixed_vs_torch_backend": lambda: check_backend([12, 1, 1, 33], [12, 25, 70, 50], 4, 2, 32, 8,
                                                            against_torch_backend=True),
}
TOLERANCE = {"decode_fp16": 2e-3, "gumbel_argmax_draws": 0.06}   # others are float32 (or exact copies)


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.test_triton_interpret"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted_kernels_match_reference(case: str, interpreted_results: dict) -> None:
    result = interpreted_results[case]
    assert result["error"] is None, result["error"]
    assert result["max_abs_diff"] < TOLERANCE.get(case, 1e-4), result


def test_decode_partition_plan() -> None:
    """Pairs of (sequence, kv head) from the target up: no split. From half the target: long contexts
    split in at most FEW_PARTITIONS partitions of at least FEW_PARTITIONS_TOKENS. Below: the fine split."""
    from workers.kernels.paged_attention import FEW_PARTITIONS, FEW_PARTITIONS_TOKENS, plan_decode_partitions

    assert plan_decode_partitions(64, 8, 4096, 128, 264).num_partitions == 1
    assert plan_decode_partitions(33, 8, 4096, 128, 264).num_partitions == 1
    few = plan_decode_partitions(32, 8, 4096, 128, 264)
    assert (few.partition_size, few.num_partitions) == (FEW_PARTITIONS_TOKENS, 4096 // FEW_PARTITIONS_TOKENS)
    long_model = plan_decode_partitions(32, 8, 65536, 128, 264)
    assert long_model.num_partitions == FEW_PARTITIONS and long_model.partition_size == 65536 // FEW_PARTITIONS
    assert plan_decode_partitions(17, 8, 900, 128, 264).num_partitions == 1   # shorter than one partition
    fine = plan_decode_partitions(16, 8, 4096, 128, 264)
    assert fine.partition_size < FEW_PARTITIONS_TOKENS and fine.num_partitions > 4


def test_decode_spans() -> None:
    """Decode launches cover powers of two from MIN_DECODE_SPAN up to max_model_len; a CUDA graph is worth
    capturing for each span whose launch differs (with one partition, max_model_len's alone)."""
    from workers.layers.attention_triton import MIN_DECODE_SPAN, TritonAttentionBackend, decode_span, decode_spans

    assert MIN_DECODE_SPAN == 512
    assert decode_spans(4096) == [512, 1024, 2048, 4096]
    assert decode_spans(3000) == [512, 1024, 2048, 3000] and decode_spans(300) == [300]
    assert [decode_span(n, 3000) for n in (1, 512, 513, 2049, 3000)] == [512, 512, 1024, 3000, 3000]
    backend = TritonAttentionBackend(torch.device("cpu"), 4096)   # 8 programs fill the CPU "device"
    assert backend.decode_graph_spans(1) == [4096]   # no head shape seen yet
    backend._head_shapes.add((4, 1, 64))
    assert backend.decode_graph_spans(1) == [512, 1024, 2048, 4096]   # partitions of 32 keys
    assert backend.decode_graph_spans(4) == [1024, 2048, 4096]   # of 1,024: 512 and 1,024 launch alike
    assert backend.decode_graph_spans(8) == [4096]   # no split


def test_split_k_plan() -> None:
    """About one program per SM; cuBLAS (None) for one row, past 256 rows, and where the output tiles alone
    fill the SMs."""
    from workers.kernels.split_k_gemm import default_config

    assert default_config(1, 1024, 2048, 132) is None and default_config(257, 1024, 2048, 132) is None
    small = default_config(16, 1024, 2048, 132)
    assert (small.block_m, small.block_n, small.splits) == (16, 32, 4)
    assert default_config(128, 1024, 3072, 132).splits == 2
    wide = default_config(256, 1024, 3072, 132)
    assert (wide.block_n, wide.splits) == (64, 2)
    assert default_config(16, 4096, 4096, 132) is None


def _index_one_element_arrays() -> None:
    """Triton 3.5 and 3.6's interpreter takes a loaded scalar (a one-element array) as a loop bound through int(), which
    numpy >= 2.4 refuses for arrays that are not 0-d."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:   # another Triton version: nothing to work around here
        return

    def patch_tensor_and_index(tensor: type, *scope: object) -> None:
        patch_tensor(tensor, *scope)   # Triton >= 3.6 passes a patch scope too
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = patch_tensor_and_index


def _run_cases() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _index_one_element_arrays()
    torch.set_num_threads(1)
    results = {}
    for name, check in CASES.items():
        try:
            results[name] = {"max_abs_diff": check(), "error": None}
        except Exception:   # reported per case by the parent
            results[name] = {"max_abs_diff": None, "error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    _run_cases()
