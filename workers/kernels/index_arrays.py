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


def varlen_index_arrays(query_lens: list[int], seq_lens: list[int], device: torch.device,
                        with_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """seq_lens [num_seqs], cu_seqlens_q [num_seqs + 1] (each sequence's first query token) and, with_order,
    the sequences by decreasing seq_len [num_seqs] (ties in order), as int32 device arrays, in one copy."""
    cu_seqlens_q = [0]
    for n in query_lens:
        cu_seqlens_q.append(cu_seqlens_q[-1] + n)
    seq_lens = list(seq_lens)
    if not with_order:
        return (*packed_int32([seq_lens, cu_seqlens_q], device), None)
    order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__, reverse=True)
    return tuple(packed_int32([seq_lens, cu_seqlens_q, order], device))
