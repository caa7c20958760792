"""Small int32 index arrays for kernel launches, copied to the device in one go (no triton import)."""

from __future__ import annotations

import torch

# Triton specializes a kernel on whether each pointer is 16-byte aligned: views at batch-dependent offsets
# would compile other variants in the middle of serving. Every array starts on a multiple of this.
ALIGN_INT32 = 4


def packed_int32(arrays: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The arrays as int32 views of one non-blocking host-to-device copy, each 16-byte aligned."""
    flat: list[int] = []
    starts = []
    for values in arrays:
        starts.append(len(flat))
        flat += values + [0] * (-len(values) % ALIGN_INT32)
    packed = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    return [packed[start:start + len(values)] for start, values in zip(starts, arrays)]


def varlen_index_arrays(query_lens: list[int], seq_lens: list[int],
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """seq_lens [num_seqs] and cu_seqlens_q [num_seqs + 1] (each sequence's first query token) as
    int32 device arrays, in one copy."""
    cu_seqlens_q = [0]
    for n in query_lens:
        cu_seqlens_q.append(cu_seqlens_q[-1] + n)
    seq_lens_t, cu_seqlens_t = packed_int32([list(seq_lens), cu_seqlens_q], device)
    return seq_lens_t, cu_seqlens_t
