"""A decode step's inputs, staged in one flat int64 buffer on the device, into the CUDA graph's static buffers:
one kernel, where a copy per buffer and an index_copy for the tokens sampled by the step before took eight
launches. At batch 1 every launch before the graph is a few microseconds of a step that is a few
milliseconds long, and none of them overlaps its neighbours (plain launches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Block-table columns a program copies per loop iteration (fixed: a width-dependent block would compile again
# for new widths in the middle of serving).
TABLE_BLOCK = 256


# The sampled tokens come from whichever step ran before: their pointer's alignment is not specialized on.
@triton.jit(do_not_specialize=["previous_ptr", "width", "stride_positions_src", "stride_positions_dst",
                               "stride_tables"])
def _scatter_decode_inputs_kernel(
    ids_src, positions_src, slots_src, seq_lens_src, order_src, tables_src, sources_src, previous_ptr,
    ids_dst, positions_dst, slots_dst, seq_lens_dst, order_dst, tables_dst,
    width, stride_positions_src, stride_positions_dst, stride_tables,
    POSITION_ROWS: tl.constexpr, HAS_PREVIOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row r of the bucket: its token (the previous step's sampled token sources[r] where that is >= 0),
    positions, slot, seq_len and longest-first rank (int32), and its block-table row of `width` columns."""
    row = tl.program_id(0)
    token = tl.load(ids_src + row)
    if HAS_PREVIOUS:
        source = tl.load(sources_src + row)
        sampled = tl.load(previous_ptr + tl.maximum(source, 0)).to(tl.int64)
        token = tl.where(source >= 0, sampled, token)
    tl.store(ids_dst + row, token)
    for axis in tl.static_range(POSITION_ROWS):
        tl.store(positions_dst + axis * stride_positions_dst + row,
                 tl.load(positions_src + axis * stride_positions_src + row))
    tl.store(slots_dst + row, tl.load(slots_src + row))
    tl.store(seq_lens_dst + row, tl.load(seq_lens_src + row).to(tl.int32))
    tl.store(order_dst + row, tl.load(order_src + row).to(tl.int32))
    table_src = tables_src + row.to(tl.int64) * width
    table_dst = tables_dst + row.to(tl.int64) * stride_tables
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < width
        tl.store(table_dst + cols, tl.load(table_src + cols, mask=inside), mask=inside)


def scatter_decode_inputs(staged: Sequence[torch.Tensor], token_sources: torch.Tensor,
                          static: Sequence[torch.Tensor], previous_tokens: torch.Tensor | None) -> None:
    """staged and static: (input_ids [rows], positions [position rows, rows], slot_mapping, seq_lens, seq_order
    [rows], block_tables [rows, columns]), as workers.cuda_graphs.DecodeInputBuffers holds them. staged: int64
    views of the step's staging buffer on the device, the bucket's rows, block_tables contiguous; static: the
    graph's buffers, at least as many rows and columns (seq_lens and seq_order int32). token_sources [rows]:
    the row of previous_tokens (the step before's sampled tokens) whose token a row takes, or -1 (its own)."""
    ids, positions, slots, seq_lens, order, tables = staged
    static_ids, static_positions, static_slots, static_seq_lens, static_order, static_tables = static
    bucket, width = tables.shape
    assert ids.shape == token_sources.shape == (bucket,) and positions.shape[1] == bucket, (ids.shape, positions.shape)
    assert positions.shape[0] == static_positions.shape[0] and positions.stride(1) == static_positions.stride(1) == 1
    assert tables.is_contiguous() and static_tables.shape[1] >= width and static_ids.shape[0] >= bucket
    assert static_seq_lens.dtype == static_order.dtype == torch.int32
    has_previous = previous_tokens is not None
    _scatter_decode_inputs_kernel[(bucket,)](
        ids, positions, slots, seq_lens, order, tables, token_sources, previous_tokens if has_previous else ids,
        static_ids, static_positions, static_slots, static_seq_lens, static_order, static_tables,
        width, positions.stride(0), static_positions.stride(0), static_tables.stride(0),
        POSITION_ROWS=positions.shape[0], HAS_PREVIOUS=has_previous, BLOCK=TABLE_BLOCK, num_warps=1,
    )
