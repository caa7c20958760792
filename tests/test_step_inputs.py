"""A step's inputs on the host: the numpy-built plan (slots, block tables, positions, placeholder rows)
against a per-token reference, and the CUDA-graph staging buffer unpacked back into padded inputs."""

from __future__ import annotations

import numpy as np
import torch

from streamvlm.contract.sampling import SamplingParams
from workers.cuda_graphs import fill_staging
from workers.model_runner import build_step_plan
from workers.scheduler import ScheduledChunk
from workers.sequence import PLACEHOLDER_TOKEN, Sequence

BS = 4


def sequence(index: int, num_tokens: int, blocks: list[int], computed: int) -> Sequence:
    seq = Sequence(f"s{index}", [10 * index + j for j in range(num_tokens)], SamplingParams(), [2], index)
    seq.block_table = list(blocks)
    seq.num_computed_tokens = computed
    return seq


def test_plan_matches_a_per_token_reference():
    prefill = sequence(0, 11, [7, 3, 9], computed=2)                  # a chunk from token 2 to the end
    decode = sequence(1, 6, [5, 1], computed=5)
    waiting = sequence(2, 9, [4, 8, 6], computed=0)                   # a first chunk that does not sample
    ahead = sequence(3, 5, [2, 0], computed=4)
    ahead.append_placeholder(source_row=3)                            # its token is in flight in row 3
    ahead.num_computed_tokens = 5
    chunks = [ScheduledChunk(decode, 5, 1), ScheduledChunk(prefill, 2, 9), ScheduledChunk(waiting, 0, 5),
              ScheduledChunk(ahead, 5, 1)]
    plan = build_step_plan(chunks, BS, uses_mrope=False)

    ids, positions, slots = [], [], []
    for chunk in chunks:
        for p in range(chunk.start, chunk.start + chunk.num_tokens):
            ids.append(chunk.seq.token_ids[p])
            positions.append(p)
            slots.append(chunk.seq.block_table[p // BS] * BS + p % BS)
    assert plan.input_ids == ids and plan.positions == positions
    assert plan.slot_array().tolist() == slots
    assert plan.table_array().tolist() == [[5, 1, 0], [7, 3, 9], [4, 8, 6], [2, 0, 0]]
    assert plan.query_lens == [1, 9, 5, 1] and plan.seq_lens == [6, 11, 5, 6]
    assert plan.logits_rows == [0, 9, 15]                              # the waiting chunk does not sample
    assert plan.placeholder_rows == [15] and plan.placeholder_sources == [3]
    assert plan.input_ids[15] == PLACEHOLDER_TOKEN


def test_block_table_array_follows_growth_and_replacement():
    seq = sequence(0, 3, [4], computed=0)
    first = seq.block_table_array()
    assert first.tolist() == [4] and seq.block_table_array() is first
    seq.block_table.append(9)
    assert seq.block_table_array().tolist() == [4, 9]
    seq.block_table = [9, 4]                                           # freed and allocated again
    assert seq.block_table_array().tolist() == [9, 4]


def test_staging_unpacks_to_the_padded_decode_inputs():
    seqs = [sequence(i, 5 + i, list(range(3 * i, 3 * i + 3)), computed=4 + i) for i in range(3)]
    seqs[1].append_placeholder(source_row=0)
    seqs[1].num_computed_tokens += 1
    chunks = [ScheduledChunk(s, s.num_computed_tokens, 1) for s in seqs]
    plan = build_step_plan(chunks, BS, uses_mrope=False)
    bucket = 4
    host = np.full(64, 99, dtype=np.int64)
    layout = fill_staging(host, plan, bucket, position_rows=1)
    inputs, sources = layout.unpack(torch.from_numpy(host))
    assert inputs.input_ids.tolist() == plan.input_ids + [0]
    assert inputs.positions.tolist() == [plan.positions + [0]]
    assert inputs.slot_mapping.tolist() == plan.slot_array().tolist() + [-1]   # padding stores no K/V
    assert inputs.seq_lens.tolist() == plan.seq_lens + [1]
    assert inputs.seq_order.tolist() == sorted(range(bucket), key=lambda i: -(plan.seq_lens + [1])[i])
    assert inputs.block_tables.tolist() == plan.table_array().tolist() + [[0] * plan.block_table_width]
    assert sources.tolist() == [-1, 0, -1, -1]   # row 1 takes the token sampled in row 0 of the step before
    assert layout.end == 4 + 4 + 12 + 4 * plan.block_table_width + 4


def test_staging_arrays_start_16_byte_aligned_for_odd_buckets():
    seqs = [sequence(0, 7, [2, 5], computed=6)]
    plan = build_step_plan([ScheduledChunk(seqs[0], 6, 1)], BS, uses_mrope=True)
    host = torch.zeros(64, dtype=torch.int64)
    buffers, sources = fill_staging(host.numpy(), plan, 1, position_rows=3).unpack(host)
    assert all(array.data_ptr() % 16 == 0 for array in (*buffers, sources))
    assert buffers.positions.tolist() == [[6]] * 3 and buffers.block_tables.tolist() == [[2, 5]]
    assert buffers.slot_mapping.tolist() == plan.slot_array().tolist() and buffers.seq_lens.tolist() == [7]


def test_staging_of_mrope_positions():
    seqs = [sequence(i, 4, [i], computed=3) for i in range(2)]
    plan = build_step_plan([ScheduledChunk(s, 3, 1) for s in seqs], BS, uses_mrope=True)
    assert plan.mrope_positions == [[3, 3], [3, 3], [3, 3]]
    host = np.zeros(64, dtype=np.int64)
    inputs, _ = fill_staging(host, plan, 2, position_rows=3).unpack(torch.from_numpy(host))
    assert inputs.positions.tolist() == [[3, 3]] * 3 and inputs.input_ids.tolist() == plan.input_ids


def test_kernel_index_arrays_start_16_byte_aligned():
    from workers.kernels.index_arrays import packed_int32

    arrays = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9]]
    views = packed_int32(arrays, torch.device("cpu"))
    assert [v.tolist() for v in views] == arrays
    assert all(v.dtype == torch.int32 and v.data_ptr() % 16 == 0 for v in views)
