"""CUDA graphs of a vision encoder, one per batch shape that recurs.

An encoder call launches a few hundred small kernels from Python (a Qwen2.5-VL tower: about 15 ms
of host time for one image, twice its device time), and its steps stall on that. A graph replays
them in one launch. Image sizes vary, so graphs are made on demand: a batch shape (for Qwen-VL
towers, the grids of the images, in order) runs eagerly the first time, which also warms the
libraries up, and is captured the second time; the least recently used graph is dropped past
``max_graphs``. All graphs share one memory pool: they run one after another on one stream, and
each output is copied out right after its replay, so what one graph leaves in the pool is never
read after another has run.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A batch shape is captured when it comes the second time.
CAPTURE_AFTER = 2
MAX_GRAPHS = 8
# Shapes seen fewer times than CAPTURE_AFTER are forgotten past this many (bounds the counter).
MAX_TRACKED_SHAPES = 256


@dataclass
class CapturedBatch:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor     # static: each call's inputs are copied in
    output: torch.Tensor     # static: cloned out after each replay
    prepared: Any            # what the capture read besides the inputs (layouts, angles): kept alive


class EncoderGraphs:
    """``run(inputs, prepared)`` is the encoder's device work alone (no host-to-device copies, no
    host syncs), ``prepare(key)`` everything it reads besides the inputs, made outside the
    capture. ``key`` determines the inputs' shape."""

    def __init__(self, run: Callable[[torch.Tensor, Any], torch.Tensor], prepare: Callable[[Hashable], Any],
                 max_rows: int, max_graphs: int = MAX_GRAPHS) -> None:
        self.run = run
        self.prepare = prepare
        self.max_rows = max_rows
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, CapturedBatch] = OrderedDict()
        self.seen: Counter[Hashable] = Counter()
        self.failed: set[Hashable] = set()
        self.pool: Any = None   # made with the first capture
        self.replays = 0

    def __call__(self, inputs: torch.Tensor, key: Hashable) -> torch.Tensor:
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._maybe_capture(inputs, key)
            if captured is None:
                return self.run(inputs, self.prepare(key))
        else:
            self.graphs.move_to_end(key)
        if captured.inputs.shape != inputs.shape:
            raise ValueError(f"encoder inputs of shape {tuple(inputs.shape)} for a batch captured with "
                             f"{tuple(captured.inputs.shape)}")
        captured.inputs.copy_(inputs)
        captured.graph.replay()
        self.replays += 1
        return captured.output.clone()

    def _maybe_capture(self, inputs: torch.Tensor, key: Hashable) -> CapturedBatch | None:
        if key in self.failed or inputs.shape[0] > self.max_rows:
            return None
        if len(self.seen) >= MAX_TRACKED_SHAPES and key not in self.seen:
            self.seen.clear()
        self.seen[key] += 1
        if self.seen[key] < CAPTURE_AFTER:
            return None
        del self.seen[key]
        try:
            captured = self._capture(inputs, key)
        except RuntimeError as exc:   # a kernel that cannot be captured: this shape stays eager
            logger.warning("encoder batch %s runs without a CUDA graph: %s", key, exc)
            self.failed.add(key)
            return None
        self.graphs[key] = captured
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return captured

    def _capture(self, inputs: torch.Tensor, key: Hashable) -> CapturedBatch:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        prepared = self.prepare(key)
        static = inputs.clone()
        graph = torch.cuda.CUDAGraph()
        # Thread-local: a KV-transfer thread's device calls during the capture are not this capture's.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.run(static, prepared)
        return CapturedBatch(graph, static, output, prepared)
