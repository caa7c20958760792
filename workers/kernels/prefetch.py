"""Read a tensor into L2 ahead of the kernel that needs it (Hopper and newer: cp.async.bulk.prefetch.L2).

At batch 1 a decoder layer's attention (the q/k rotary, decode attention and its reduction) is a chain of
short, latency-bound kernels that leave HBM idle for several microseconds, and the output projection
after them is a GEMV bound by reading its weights. Prefetching those weights into L2 at the start of the
chain moves that read into the idle time: the GEMV then streams them from L2.

A prefetch writes nothing that any kernel reads, so it keeps the programmatic-launch contract of
workers/kernels/launch.py: it waits for the kernel before it (so that the kernels after it, which wait
for it, still wait for everything before), lets the next kernel launch and issues its bulk prefetches.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from workers.kernels.launch import programmatic_launch, start_dependents_and_wait

CHUNK_BYTES = 16384      # bytes per bulk prefetch instruction
CHUNKS_PER_PROGRAM = 128


@triton.jit(do_not_specialize=["num_bytes"])
def _prefetch_l2_kernel(base_ptr, num_bytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr,
                        USE_PDL: tl.constexpr):
    start_dependents_and_wait(USE_PDL)
    offsets = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    sizes = tl.minimum(num_bytes - offsets, CHUNK).to(tl.int32)
    # A chunk past the end gets size <= 0 and is skipped (the predicate), so that no address past the
    # tensor is touched.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base_ptr + offsets, sizes], dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def prefetch_supported(device: torch.device) -> bool:
    return device.type == "cuda" and _supported(device.index if device.index is not None
                                                else torch.cuda.current_device())


def prefetch_l2(t: torch.Tensor) -> None:
    """Start reading a contiguous CUDA tensor into L2 (a no-op where the device cannot prefetch)."""
    if not prefetch_supported(t.device) or t.numel() == 0:
        return
    assert t.is_contiguous() and t.data_ptr() % 16 == 0, (t.shape, t.stride())
    num_bytes = t.numel() * t.element_size() // 16 * 16
    pdl = programmatic_launch(t.device)
    grid = (triton.cdiv(num_bytes, CHUNK_BYTES * CHUNKS_PER_PROGRAM),)
    _prefetch_l2_kernel[grid](t.view(torch.uint8) if t.dtype != torch.uint8 else t, num_bytes,
                              CHUNK=CHUNK_BYTES, PER_PROGRAM=CHUNKS_PER_PROGRAM, USE_PDL=pdl,
                              num_warps=4, launch_pdl=pdl)
