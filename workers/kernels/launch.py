"""Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the
kernel before it in the stream is still finishing, and waits (gdc_wait) before it touches anything
that kernel wrote. Each of our kernels lets its successor start as soon as it has started itself
(gdc_launch_dependents) and waits before its first read of activations; the GEMV streams its first
weight tile before it waits, and decode attention its step inputs and older keys. At batch 1, where a
step is some 300 short kernels, this hides each kernel's launch and its first memory round trip behind
the tail of the one before.

The contract that keeps this safe: a kernel launched with ``launch_pdl`` reads or writes nothing
that another kernel writes, or wrote, before its gdc_wait. Kernels launched without it (torch's)
wait for the whole stream as usual.

STREAMVLM_DISABLE_PDL=1 launches every kernel plainly (to measure what this is worth).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:   # older Triton: launches stay plain
    HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


@functools.cache
def _supported(device_index: int) -> bool:
    return (HAS_GDC and torch.cuda.get_device_capability(device_index)[0] >= 9
            and os.environ.get("STREAMVLM_DISABLE_PDL", "0") in ("", "0"))


@functools.cache
def multiprocessors(device_index: int) -> int:
    """The device's SM count (cached: kernels size their grids from it on every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels on this device launch with programmatic dependent launch."""
    return device.type == "cuda" and _supported(device.index if device.index is not None
                                                else torch.cuda.current_device())


@triton.jit
def start_dependents_and_wait(USE_PDL: tl.constexpr):
    """At a kernel's start: let the next kernel launch, then wait for the one before."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
