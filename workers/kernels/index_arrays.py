"""Integer arrays for a step (its inputs, kernels' index arrays), copied to the device in one go (no triton
import)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Triton specializes a kernel on whether each pointer is 16-byte aligned: views at batch-dependent offsets
# would compile other variants in the middle of serving. Every array starts on a multiple of 16 bytes.
ALIGN_BYTES = 16


def packed(arrays: list[Sequence[int] | np.ndarray], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The arrays (lists or numpy arrays of integers) as views of one non-blocking host-to-device copy, each
    16-byte aligned. On CUDA the host side is pinned memory (from torch's caching host allocator, which keeps
    it until the copy is done): a copy from pageable memory would wait for the work already queued on the
    stream, and the host could not run ahead of the device."""
    align = ALIGN_BYTES // dtype.itemsize
    starts, total = [], 0
    for values in arrays:
        starts.append(total)
        total += len(values) + (-len(values) % align)
    host = torch.empty(max(total, 1), dtype=dtype, pin_memory=device.type == "cuda")
    flat = host.numpy()
    for start, values in zip(starts, arrays):
        flat[start:start + len(values)] = values
    staged = host.to(device, non_blocking=True)
    return [staged[start:start + len(values)] for start, values in zip(starts, arrays)]


def packed_int32(arrays: list[Sequence[int] | np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays as int32 views of one non-blocking host-to-device copy (see packed)."""
    return packed(arrays, torch.int32, device)


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
