"""Attention over the paged KV cache: split-K decode and varlen (chunked) prefill.

Caches are [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] map each
sequence's logical blocks to cache blocks. Queries are [num_tokens, num_heads, head_dim]; query head h reads
kv head h // (num_heads // num_kv_heads).

Both kernels put the query heads that share a kv head into the rows of one tile, so that each key/value tile
is read once per group. Key tiles gather their rows through the block table, so a tile may span several
cache blocks (or part of one): tile sizes do not depend on the block size. Softmax runs in base 2 with
log2(e) folded into the scale; accumulation is float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from workers.kernels.index_arrays import packed_int32
from workers.kernels.launch import gdc_launch_dependents, gdc_wait, multiprocessors, programmatic_launch

LOG2E = 1.4426950408889634
# Split-K decode: at most MAX_PARTITIONS partitions per sequence, none shorter than MIN_PARTITION_TOKENS,
# except for batches so small that a context of SHORT_CONTEXT_TOKENS would not fill the device with them.
MIN_PARTITION_TOKENS = 256
MAX_PARTITIONS = 256
SHORT_CONTEXT_TOKENS = 256
# Between half the target's programs and the target from (sequence, kv head) pairs: at most this many
# partitions, of at least this many tokens.
FEW_PARTITIONS = 8
FEW_PARTITIONS_TOKENS = 1024


@triton.jit
def _cache_rows(table_ptr, positions, valid, kv_head, stride_block, stride_slot, stride_head,
                BLOCK_SIZE: tl.constexpr):
    """Element offsets of the cache rows holding `positions` of one sequence (0 where not valid)."""
    blocks = tl.load(table_ptr + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return blocks * stride_block + (positions % BLOCK_SIZE) * stride_slot + kv_head * stride_head


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, rows, dims, mask):
    """Keys and values at the cache rows `rows` (element offsets), where mask [rows, dims] holds (0 elsewhere)."""
    offsets = rows[:, None] + dims[None, :]
    return (tl.load(k_cache_ptr + offsets, mask=mask, other=0.0),
            tl.load(v_cache_ptr + offsets, mask=mask, other=0.0))


@triton.jit
def _online_softmax_update(q, k, v, may_attend, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One key/value tile of flash-attention: returns the running row max, row sum and unnormalized output.

    Every row must see at least one key in the first tile it is given, so that the running max is finite.
    """
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(may_attend, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _merge_group_partitions(out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, seq, kv_head, num_parts, num_heads,
                            max_partitions, stride_o_token, stride_o_head,
                            QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                            MERGE_ROWS: tl.constexpr, PARTS_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """The output of a kv head's query heads from its partitions' (max, sum, unnormalized output).
    Loads bypass L1 (.cg): the partials were written by other programs of the same launch."""
    group = tl.arange(0, MERGE_ROWS)
    heads = kv_head * QUERIES_PER_KV + group
    head_valid = group < QUERIES_PER_KV
    base = (seq.to(tl.int64) * num_heads + heads) * max_partitions
    parts = tl.arange(0, PARTS_PAD)
    stats_mask = head_valid[:, None] & (parts[None, :] < num_parts)
    maxes = tl.load(part_max_ptr + base[:, None] + parts[None, :], mask=stats_mask, other=float("-inf"),
                    cache_modifier=".cg")
    sums = tl.load(part_sum_ptr + base[:, None] + parts[None, :], mask=stats_mask, other=0.0, cache_modifier=".cg")
    global_max = tl.max(maxes, 1)
    global_max = tl.where(head_valid, global_max, 0.0)
    total = tl.sum(tl.where(stats_mask, tl.exp2(maxes - global_max[:, None]) * sums, 0.0), 1)

    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    acc = tl.zeros([MERGE_ROWS, DIM_PAD], tl.float32)
    for chunk_start in range(0, num_parts, CHUNK):
        chunk = chunk_start + tl.arange(0, CHUNK)
        chunk_mask = head_valid[:, None] & (chunk[None, :] < num_parts)
        stats = base[:, None] + chunk[None, :]
        weights = tl.exp2(tl.load(part_max_ptr + stats, mask=chunk_mask, other=float("-inf"), cache_modifier=".cg")
                          - global_max[:, None])
        weights = tl.where(chunk_mask, weights, 0.0)
        partial = tl.load(part_acc_ptr + stats[:, :, None] * HEAD_DIM + dims[None, None, :],
                          mask=chunk_mask[:, :, None] & dim_valid[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(weights[:, :, None] * partial, 1)
    out = acc / tl.where(head_valid, total, 1.0)[:, None]
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None] & dim_valid[None, :])


# Integers that vary from step to step are not specialized on (Triton would compile a variant for each of
# ==1, divisible by 16 and neither): a kernel compiles once, at start-up, never in the middle of serving.
@triton.jit(do_not_specialize=["partition_size", "max_partitions", "stride_table_seq"])
def _paged_decode_kernel(
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, arrivals_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, seq_order_ptr,
    qk_scale, partition_size, num_heads, max_partitions,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ORDERED: tl.constexpr, USE_PDL: tl.constexpr, MERGE_ROWS: tl.constexpr, PARTS_PAD: tl.constexpr,
    MERGE_CHUNK: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One (sequence, kv head, context partition): the group's query heads against the partition's keys.

    SPLIT: the program that finishes a (sequence, kv head)'s partitions last (counted in arrivals, which it
    sets back to 0) merges them into the output, so that no second kernel waits for this one; a context
    within one partition is written directly. (On an H200, Qwen3-8B at batch 1: 4.050 ms a token against
    4.110 with a second kernel.)

    ORDERED: the grid is (kv head, rank, partition) and rank r runs sequence seq_order[r], so that the
    programs start in the order the host chose (longest context first: a long sequence started last
    would run alone at the end of the launch).

    Before the wait (USE_PDL), a program reads the step inputs (copied before the step's first kernel), and
    programs past their sequence's end exit. ONE_TILE (a partition is one short key tile, as for the one to
    four sequences of the smallest batches): the program also loads its keys and values but the newest;
    the newest key and value, which the kernel just before this one writes, are read after the wait. On an
    H200 (Qwen3-8B, batch 1, 256 keys, graph step) that is 3.722 ms against 3.743-3.755 without (the first
    tile of every partition read before the wait cost the long partitions of large batches far more)."""
    if USE_PDL:
        gdc_launch_dependents()
    if ORDERED:
        kv_head = tl.program_id(0)
        seq = tl.load(seq_order_ptr + tl.program_id(1))
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = partition * partition_size
    if start >= seq_len:
        return
    end = tl.minimum(start + partition_size, seq_len)

    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * QUERIES_PER_KV + group
    head_valid = group < QUERIES_PER_KV
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    row_mask = head_valid[:, None] & dim_valid[None, :]
    token = seq.to(tl.int64)   # decode: sequence i owns flat token i
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    q_ptrs = q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + dims[None, :]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    if ONE_TILE:
        positions = start + tl.arange(0, TILE_N)
        valid = positions < end
        rows = _cache_rows(table_ptr, positions, valid, kv_head,
                           stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_SIZE)
        newest = seq_len - 1
        earlier_mask = (valid & (positions < newest))[:, None] & dim_valid[None, :]
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, rows, dims, earlier_mask)
        if USE_PDL:
            gdc_wait()
        if newest < end:
            newest_mask = (positions == newest)[:, None] & dim_valid[None, :]
            newest_k, newest_v = _load_kv_tile(k_cache_ptr, v_cache_ptr, rows, dims, newest_mask)
            k = tl.where(newest_mask, newest_k, k)
            v = tl.where(newest_mask, newest_v, v)
        q = tl.load(q_ptrs, mask=row_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_update(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)
    else:
        if USE_PDL:
            gdc_wait()
        q = tl.load(q_ptrs, mask=row_mask, other=0.0)
        for tile_start in range(start, end, TILE_N):
            positions = tile_start + tl.arange(0, TILE_N)
            valid = positions < end
            rows = _cache_rows(table_ptr, positions, valid, kv_head,
                               stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_SIZE)
            k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, rows, dims, valid[:, None] & dim_valid[None, :])
            m_i, l_i, acc = _online_softmax_update(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale,
                                                   DOT_PRECISION)

    num_parts = tl.cdiv(seq_len, partition_size)
    if SPLIT and num_parts > 1:
        stats = (seq.to(tl.int64) * num_heads + heads) * max_partitions + partition
        tl.store(part_max_ptr + stats, m_i, mask=head_valid)
        tl.store(part_sum_ptr + stats, l_i, mask=head_valid)
        tl.store(part_acc_ptr + stats[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask)
        # Every thread's stores, then one release: the last arrival's acquire sees all partitions.
        tl.debug_barrier()
        arrivals = arrivals_ptr + seq * (num_heads // QUERIES_PER_KV) + kv_head
        if tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu") == num_parts - 1:
            _merge_group_partitions(out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, seq, kv_head, num_parts,
                                    num_heads, max_partitions, stride_o_token, stride_o_head,
                                    QUERIES_PER_KV, HEAD_DIM, DIM_PAD, MERGE_ROWS, PARTS_PAD, MERGE_CHUNK)
            tl.store(arrivals, 0)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + token * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=["stride_table_seq"])
def _paged_prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr,
    tile_seqs_ptr, tile_starts_ptr, qk_scale,
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (query tile, kv head): BLOCK_Q query tokens of one sequence times the group's query heads
    (row r = token r // QUERIES_PER_KV, head r % QUERIES_PER_KV) against the sequence's keys, causally."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile)
    q_tile_start = tl.load(tile_starts_ptr + tile)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    cached_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    q_offsets = q_tile_start + rows // QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_offsets < query_len)
    q_positions = cached_len + q_offsets
    tokens = (q_begin + q_offsets).to(tl.int64)
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    row_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask, other=0.0)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table_seq

    # Keys up to the tile's last query position; key 0 is visible to every row, so each row's max is finite.
    kv_end = tl.minimum(seq_len, cached_len + q_tile_start + BLOCK_Q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    for tile_start in range(0, kv_end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        valid = positions < kv_end
        cache_rows = _cache_rows(table_ptr, positions, valid, kv_head,
                                 stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_SIZE)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, cache_rows, dims, valid[:, None] & dim_valid[None, :])
        may_attend = valid[None, :] & (positions[None, :] <= q_positions[:, None])
        m_i, l_i, acc = _online_softmax_update(q, k, v, may_attend, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------------------------------------------
# Host side


@dataclass(frozen=True)
class DecodePartitions:
    """How the decode kernel splits each sequence's context (num_partitions == 1: no split, no merge)."""
    partition_size: int     # tokens, a multiple of tile_n
    num_partitions: int     # of the longest sequence
    tile_n: int             # keys per step of the kernel's loop

    def covering(self, max_seq_len: int) -> DecodePartitions:
        """The same partitions, launched for contexts of at most max_seq_len keys only."""
        return replace(self, num_partitions=triton.cdiv(max_seq_len, self.partition_size))


@dataclass(frozen=True)
class DecodeWorkspace:
    part_max: torch.Tensor  # [num_seqs, num_heads, num_partitions] float32
    part_sum: torch.Tensor  # [num_seqs, num_heads, num_partitions] float32
    part_acc: torch.Tensor  # [num_seqs, num_heads, num_partitions, head_dim] float32
    arrivals: torch.Tensor  # [num_seqs, num_kv_heads] int32, 0 between launches: programs done per kv head


@dataclass(frozen=True)
class PrefillLaunch:
    """One launch of the prefill kernel: which (sequence, first query offset) each query tile covers."""
    block_m: int
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int
    tile_seqs: torch.Tensor     # [num_tiles] int32
    tile_starts: torch.Tensor   # [num_tiles] int32


@dataclass(frozen=True)
class _TileShape:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _decode_tile_n(head_dim: int) -> int:
    return 64 if _dim_pad(head_dim) <= 128 else 32


# Partitions of at most this many keys are one tile of this many: the smallest tile that pays (see
# plan_decode_partitions).
SHORT_TILE_N = 32


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise round to tf32 on tensor cores; the setting is moot for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _stages(dtype: torch.dtype, stages: int) -> int:
    # The tile shapes are sized for 16-bit inputs: float32 tiles would not fit several times in shared memory.
    return 1 if dtype.itemsize == 4 else stages


def default_decode_programs(device: torch.device) -> int:
    """About how many decode programs keep the device busy (split-K aims for at least this many)."""
    if device.type == "cuda":
        return 2 * multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def plan_decode_partitions(num_seqs: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                           target_programs: int, partition_size: int | None = None) -> DecodePartitions:
    """Split the context only when (sequences x kv heads) alone leave the device idle. A few sequences
    split finer, so that short contexts too fill the device (a partition size depends on num_seqs and
    max_seq_len only, never on the contexts, so that one plan serves a CUDA graph's every replay).

    With at least the target's programs from (sequence, kv head) pairs alone, nothing splits: on an
    H200 (Qwen3-0.6B heads, blocks of 16) one program per pair reads the cache at 96-100% of the copy
    bandwidth from 64 sequences of 700 keys up, where partitions sized for a 4,096-token context (most of
    them past every sequence's end) read at 85% (`benchmarks/attention.py`); splitting 33-66 sequences in
    partitions of 512 or 1,024 keys gained only near 37 sequences and lost at 48-59. From half the target, an SM
    holds one or two pairs' programs, too few to keep its loads in flight over a long context: long
    contexts split in a few large partitions (there, 23 sequences of 1,074-1,895 keys: 48.6 us against
    65.5 us unsplit; 32 of 1,500 keys: 56.3 against 59.6).

    A partition of at most SHORT_TILE_N keys is one tile of that many (the kernel's ONE_TILE path, which reads
    the keys before its wait). Qwen3-8B at batch 1 and 256 keys, graph step on an H200: 3.712 ms with 32-key
    tiles against 3.743-3.755 with 64; 16-key tiles 3.800."""
    pairs = num_seqs * num_kv_heads
    if partition_size is None and pairs >= target_programs:
        partition_size = max_seq_len
    elif partition_size is None and 2 * pairs >= target_programs:
        partition_size = max(FEW_PARTITIONS_TOKENS, triton.cdiv(max_seq_len, FEW_PARTITIONS))
    if partition_size is None:
        wanted = triton.cdiv(target_programs, num_kv_heads)
        parts = max(1, min(wanted, triton.cdiv(max_seq_len, MIN_PARTITION_TOKENS), MAX_PARTITIONS))
        for_long = triton.cdiv(max_seq_len, parts)
        for_short = triton.cdiv(num_seqs * num_kv_heads * SHORT_CONTEXT_TOKENS, target_programs)
        partition_size = max(min(for_long, for_short), triton.cdiv(max_seq_len, MAX_PARTITIONS))
    tile_n = _decode_tile_n(head_dim)
    if partition_size <= SHORT_TILE_N:
        tile_n = min(tile_n, SHORT_TILE_N)
    partition_size = max(tile_n, triton.cdiv(partition_size, tile_n) * tile_n)
    return DecodePartitions(partition_size, triton.cdiv(max_seq_len, partition_size), tile_n)


def decode_workspace(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, num_partitions: int,
                     device: torch.device) -> DecodeWorkspace:
    stats = (num_seqs, num_heads, num_partitions)
    return DecodeWorkspace(torch.empty(stats, dtype=torch.float32, device=device),
                           torch.empty(stats, dtype=torch.float32, device=device),
                           torch.empty(stats + (head_dim,), dtype=torch.float32, device=device),
                           torch.zeros((num_seqs, num_kv_heads), dtype=torch.int32, device=device))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor) -> tuple[int, int]:
    """Returns (num_kv_heads, queries per kv head)."""
    assert q.dim() == 3 and q.stride(-1) == 1, (q.shape, q.stride())
    num_heads, head_dim = q.shape[1:]
    assert k_cache.dim() == 4 and k_cache.shape[-1] == head_dim, (k_cache.shape, q.shape)
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and k_cache.stride(-1) == 1, \
        (k_cache.shape, k_cache.stride(), v_cache.shape, v_cache.stride())
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    block_size = k_cache.shape[1]
    assert block_size >= 1 and block_size & (block_size - 1) == 0, f"block size {block_size} is not a power of two"
    assert block_tables.dim() == 2 and block_tables.stride(-1) == 1, (block_tables.shape, block_tables.stride())
    assert seq_lens.dim() == 1 and seq_lens.shape[0] == block_tables.shape[0], (seq_lens.shape, block_tables.shape)
    assert q.device == k_cache.device == v_cache.device == block_tables.device == seq_lens.device
    return num_kv_heads, num_heads // num_kv_heads


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                           *, partitions: DecodePartitions | None = None, workspace: DecodeWorkspace | None = None,
                           out: torch.Tensor | None = None, seq_order: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence: q [num_seqs, num_heads, head_dim] (row i belongs to sequence i) against
    the first seq_lens[i] (>= 1) keys of sequence i. seq_lens [num_seqs] int32, block_tables [num_seqs,
    max_blocks] int32/int64; max_seq_len >= max(seq_lens) sizes the launch (no device read). seq_order
    (int32 [num_seqs], a permutation): the order the sequences' programs start in.
    Returns [num_seqs, num_heads, head_dim] in q's dtype."""
    num_kv_heads, queries_per_kv = _check_cache(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs, num_heads, head_dim = q.shape
    assert seq_lens.shape[0] == num_seqs, (seq_lens.shape, q.shape)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1, (out.shape, out.stride())
    if num_seqs == 0:
        return out
    if partitions is None:
        partitions = plan_decode_partitions(num_seqs, num_kv_heads, max_seq_len, head_dim,
                                            default_decode_programs(q.device))
    split = partitions.num_partitions > 1
    if split and workspace is None:
        workspace = decode_workspace(num_seqs, num_heads, num_kv_heads, head_dim, partitions.num_partitions,
                                     q.device)
    if split:
        assert workspace.part_acc.shape == (num_seqs, num_heads, partitions.num_partitions, head_dim), \
            (workspace.part_acc.shape, partitions)
        part_max, part_sum, part_acc = workspace.part_max, workspace.part_sum, workspace.part_acc
        arrivals = workspace.arrivals
    else:
        part_max = part_sum = part_acc = arrivals = out    # not touched

    dim_pad = _dim_pad(head_dim)
    pdl = programmatic_launch(q.device)
    ordered = seq_order is not None
    grid = ((num_kv_heads, num_seqs) if ordered else (num_seqs, num_kv_heads)) + (partitions.num_partitions,)
    merge_rows = triton.next_power_of_2(queries_per_kv)
    parts_pad = triton.next_power_of_2(partitions.num_partitions)
    _paged_decode_kernel[grid](
        out, part_max, part_sum, part_acc, arrivals,
        q, k_cache, v_cache, block_tables, seq_lens, seq_order if ordered else seq_lens,
        scale * LOG2E, partitions.partition_size, num_heads, partitions.num_partitions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim,
        GROUP_PAD=max(16, triton.next_power_of_2(queries_per_kv)), DIM_PAD=dim_pad,
        BLOCK_SIZE=k_cache.shape[1], TILE_N=partitions.tile_n, SPLIT=split,
        DOT_PRECISION=_dot_precision(q.dtype), ORDERED=ordered, USE_PDL=pdl,
        MERGE_ROWS=merge_rows, PARTS_PAD=parts_pad,
        MERGE_CHUNK=max(1, min(parts_pad, 4096 // (merge_rows * dim_pad))),
        ONE_TILE=partitions.tile_n == SHORT_TILE_N == partitions.partition_size,
        num_warps=4, num_stages=_stages(q.dtype, 3 if dim_pad <= 128 else 2), launch_pdl=pdl,
    )
    return out


def _prefill_tile_shapes(queries_per_kv: int, head_dim: int) -> tuple[_TileShape, _TileShape]:
    """(short queries, long queries). Short: a tile of the group's heads for few tokens, as decode needs;
    long: a large tile of rows, as prefill needs to reuse each key tile across many queries."""
    group_rows = triton.next_power_of_2(queries_per_kv)
    wide_dim = _dim_pad(head_dim) > 128
    block_n = 32 if wide_dim else 64
    short = _TileShape(max(16, group_rows), block_n, num_warps=4, num_stages=2)
    long_m = max(64 if wide_dim else 128, group_rows)
    # Four warps and three stages for 128 x 64 tiles: on an H200 (Qwen3-0.6B heads, bfloat16) 16 prompts of 1,024
    # tokens take 282 us against 360 us with eight warps and two stages, 4 chunks of 512 over 512 cached 57 against
    # 78 us; 128 x 128 tiles and 64-row tiles measured in between (tile configs timed as benchmarks/attention.py
    # times its prefill cases).
    long = (_TileShape(long_m, block_n, num_warps=8 if long_m >= 128 else 4, num_stages=2) if wide_dim
            else _TileShape(long_m, block_n, num_warps=4, num_stages=3))
    return short, long


def plan_prefill(query_lens: list[int], queries_per_kv: int, head_dim: int,
                 device: torch.device) -> list[PrefillLaunch]:
    """Query tiles for every sequence. A sequence whose query fits in one short tile (decodes, short chunks)
    is computed with short tiles, the others with long ones: two launches at most."""
    shapes = _prefill_tile_shapes(queries_per_kv, head_dim)
    short_q = max(1, shapes[0].block_m // queries_per_kv)
    per_shape: list[tuple[list[int], list[int]]] = [([], []), ([], [])]
    for seq, query_len in enumerate(query_lens):
        which = 0 if query_len <= short_q else 1
        block_q = max(1, shapes[which].block_m // queries_per_kv)
        seqs, starts = per_shape[which]
        # Last tiles first: they see the most keys, and the device runs programs roughly in launch order.
        for start in reversed(range(0, query_len, block_q)):
            seqs.append(seq)
            starts.append(start)
    tile_lists = packed_int32([values for pair in per_shape for values in pair], device)
    launches = []
    for shape, (seqs, _), tile_seqs, tile_starts in zip(shapes, per_shape, tile_lists[::2], tile_lists[1::2]):
        if seqs:
            launches.append(PrefillLaunch(shape.block_m, max(1, shape.block_m // queries_per_kv),
                                          shape.block_n, shape.num_warps, shape.num_stages, tile_seqs, tile_starts))
    return launches


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            scale: float, launches: list[PrefillLaunch],
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention: sequence b's query_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b] tokens (rows
    cu_seqlens_q[b]: of q) sit at positions [seq_lens[b] - query_len_b, seq_lens[b]) and attend to keys at
    positions <= their own, all of them already in the cache. `launches` from plan_prefill(query_lens, ...).
    Returns [num_tokens, num_heads, head_dim] in q's dtype."""
    num_kv_heads, queries_per_kv = _check_cache(q, k_cache, v_cache, block_tables, seq_lens)
    head_dim = q.shape[2]
    assert cu_seqlens_q.shape == (seq_lens.shape[0] + 1,) and cu_seqlens_q.device == q.device, \
        (cu_seqlens_q.shape, seq_lens.shape)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1, (out.shape, out.stride())
    for launch in launches:
        assert launch.block_q == max(1, launch.block_m // queries_per_kv), (launch, queries_per_kv)
        _paged_prefill_kernel[(launch.tile_seqs.shape[0], num_kv_heads)](
            out, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
            launch.tile_seqs, launch.tile_starts, scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim, DIM_PAD=_dim_pad(head_dim),
            BLOCK_M=launch.block_m, BLOCK_Q=launch.block_q, BLOCK_N=launch.block_n,
            BLOCK_SIZE=k_cache.shape[1], DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=launch.num_warps, num_stages=_stages(q.dtype, launch.num_stages),
        )
    return out

