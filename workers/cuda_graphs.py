"""CUDA graphs for decode steps: one graph per batch-size bucket and decode span, captured at start-up.

A decode step (one new token per sequence, no encoder rows) of B sequences replays the graph of
the smallest bucket >= B, and of that bucket's smallest span >= its longest context (the attention
backend names the spans worth a graph of their own: a launch sized for max_model_len would start
programs for partitions past every context). Its inputs reach the static buffers in one host-to-device
copy from pinned memory and one kernel that scatters them (and the tokens sampled by the step before);
the rows past B are padding: their K/V store is skipped (slot -1) and they attend to one key of block 0,
and their output is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from workers.rank_messages import StepPlan
from workers.layers.attention_base import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (which is always a bucket)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch]
    buckets += list(range(16, max_batch, 16))
    return sorted(set(buckets + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: nn.Module, backend, device: torch.device, max_batch: int,
                 max_model_len: int, block_size: int, uses_mrope: bool) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.position_rows = 3 if uses_mrope else 1
        n = max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.position_rows, n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.seq_order = torch.arange(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int64, device=device)
        self.static_inputs = DecodeInputBuffers(self.input_ids, self.positions, self.slot_mapping, self.seq_lens,
                                                self.seq_order, self.block_tables)
        from workers.kernels.decode_inputs import scatter_decode_inputs   # triton: only where graphs are built

        self._scatter = scatter_decode_inputs
        # One pinned staging buffer per step in flight (async scheduling queues a step before the last one ran).
        size = StagingLayout(n, self.position_rows, self.max_blocks, 0).end
        self._staging = [torch.zeros(size, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._next_staging = 0
        self.buckets = batch_buckets(max_batch)
        # Per bucket, the decode spans captured, ascending (the last is max_model_len); set by capture(), once
        # the model's first steps showed the backend its head shapes.
        self.spans: dict[int, list[int]] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}   # by (bucket, span)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        # The captures' metadata holds what their launches read and write besides the static buffers (the
        # decode workspaces): kept for as long as the graphs replay.
        self.metas: dict[tuple[int, int], AttentionMetadata] = {}

    def _meta(self, b: int, span: int) -> AttentionMetadata:
        meta = AttentionMetadata(query_lens=[1] * b, seq_lens=[span] * b,
                                 slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 block_size=self.block_size)
        self.backend.prepare_decode_graph(meta, self.seq_lens[:b], self.seq_order[:b])
        return meta

    def _positions(self, b: int) -> torch.Tensor:
        return self.positions[:, :b] if self.position_rows == 3 else self.positions[0, :b]

    def _compile_scatter(self) -> None:
        """Both variants of the input kernel (with and without sampled tokens to take) compile now, not at the
        first steps: the static buffers get the padding rows' values they start with."""
        layout = StagingLayout(1, self.position_rows, 1, 0)
        staged, sources = layout.unpack(torch.zeros(layout.end, dtype=torch.int64, device=self.device))
        staged.slot_mapping.fill_(-1)
        staged.seq_lens.fill_(1)
        sources.fill_(-1)
        for previous in (None, torch.zeros(1, dtype=torch.int64, device=self.device)):
            self._scatter(staged, sources, self.static_inputs, previous)

    def _warm_up(self, stream: torch.cuda.Stream, b: int, meta: AttentionMetadata, steps: int) -> None:
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(steps):
                self.model(self.input_ids[:b], self._positions(b), meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)

    @torch.inference_mode()
    def capture(self) -> None:
        """Every graph, anew (what an earlier capture made is dropped)."""
        self.spans.clear()
        self.graphs.clear()
        self.outputs.clear()
        self.metas.clear()
        start = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self._compile_scatter()
        pool = None
        stream = torch.cuda.Stream(self.device)
        # Which spans pay depends on the model's head shapes: the backend learns them from a first step.
        self._warm_up(stream, self.max_batch, self._meta(self.max_batch, self.max_model_len), steps=1)
        self.spans = {b: self.backend.decode_graph_spans(b) for b in self.buckets}
        # The largest first: the smaller ones reuse its memory.
        for key in sorted(((b, span) for b in self.buckets for span in self.spans[b]), reverse=True):
            b, span = key
            meta = self._meta(b, span)
            self.metas[key] = meta
            self._warm_up(stream, b, meta, steps=2)   # Triton compiles, launch plans and workspaces exist
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[key] = self.model(self.input_ids[:b], self._positions(b), meta)
            pool = graph.pool()
            self.graphs[key] = graph
        # A graph's first launch uploads it (0.4-0.5 ms more than a replay on an H200): done here, not in a step.
        for graph in self.graphs.values():
            graph.replay()
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("CUDA graphs: %d decode graphs (%d batch sizes up to %d) captured in %.1f s (%.0f MiB)",
                    len(self.graphs), len(self.buckets), self.max_batch, time.monotonic() - start, used / 2**20)

    def graph_for(self, plan: StepPlan) -> tuple[int, int] | None:
        """The key of the graph that replays this step, or None where none can (not a decode step, more
        sequences than the largest bucket, encoder rows, a context past max_model_len)."""
        n = len(plan.input_ids)
        if not (0 < n <= self.max_batch and not plan.mm_rows and len(plan.query_lens) == n):
            return None
        max_seq_len = max(plan.seq_lens)
        if max_seq_len > self.max_model_len:
            return None
        b = next(size for size in self.buckets if size >= n)   # (bucket, its smallest span that covers the step)
        return b, next(span for span in self.spans[b] if span >= max_seq_len)

    def run(self, plan: StepPlan, key: tuple[int, int], previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode step, replayed from the graph graph_for(plan) named. Placeholder
        rows take their token from previous_tokens, the sampled tokens of the step before, still on the device."""
        n = len(plan.input_ids)
        b = key[0]
        staging = self._staging[self._next_staging]
        self._next_staging ^= 1
        layout = fill_staging(staging.numpy(), plan, b, self.position_rows)
        staged, sources = layout.unpack(staging[:layout.end].to(self.device, non_blocking=True))
        self._scatter(staged, sources, self.static_inputs, previous_tokens if layout.num_holes else None)
        self.graphs[key].replay()
        return self.outputs[key][:n]


class DecodeInputBuffers(NamedTuple):
    """A decode step's inputs, in the order workers.kernels.decode_inputs takes them."""
    input_ids: torch.Tensor      # [rows]
    positions: torch.Tensor      # [position rows, rows]
    slot_mapping: torch.Tensor   # [rows]
    seq_lens: torch.Tensor       # [rows]
    seq_order: torch.Tensor      # [rows]: the rows by decreasing seq_len (decode attention's start order)
    block_tables: torch.Tensor   # [rows, width]


def _aligned(count: int) -> int:
    """int64 elements rounded up to 16 bytes: every array of the staging buffer starts 16-byte aligned (Triton
    specializes on a pointer's alignment, and views at bucket-dependent offsets would compile variants)."""
    return count + count % 2


@dataclass(frozen=True)
class StagingLayout:
    """Where fill_staging put a decode step's inputs in the flat int64 buffer: ids, position rows, slots,
    seq_lens, seq_order, block tables, then each row's token source (the row of the previous step's sampled
    tokens it takes its token from, -1 for its own), each array from a 16-byte boundary."""
    bucket: int
    position_rows: int
    width: int
    num_holes: int

    @property
    def positions(self) -> int:
        return _aligned(self.bucket)

    @property
    def slots(self) -> int:
        return self.positions + _aligned(self.position_rows * self.bucket)

    @property
    def seq_lens(self) -> int:
        return self.slots + _aligned(self.bucket)

    @property
    def seq_order(self) -> int:
        return self.seq_lens + _aligned(self.bucket)

    @property
    def tables(self) -> int:
        return self.seq_order + _aligned(self.bucket)

    @property
    def sources(self) -> int:
        return self.tables + _aligned(self.bucket * self.width)

    @property
    def end(self) -> int:
        return self.sources + self.bucket

    def unpack(self, flat: torch.Tensor) -> tuple[DecodeInputBuffers, torch.Tensor]:
        """The arrays as views of flat, and the token sources."""
        b = self.bucket
        buffers = DecodeInputBuffers(flat[:b], flat[self.positions:self.positions + self.position_rows * b]
                                     .view(self.position_rows, b),
                                     *(flat[start:start + b] for start in (self.slots, self.seq_lens, self.seq_order)),
                                     flat[self.tables:self.tables + b * self.width].view(b, self.width))
        return buffers, flat[self.sources:self.end]


def longest_first(seq_lens: np.ndarray) -> np.ndarray:
    """Row indexes by decreasing seq_len (ties in row order)."""
    return np.argsort(-seq_lens, kind="stable")


def fill_staging(host: np.ndarray, plan: StepPlan, bucket: int, position_rows: int) -> StagingLayout:
    """A decode step's inputs, padded to the bucket, into one flat int64 host buffer. Padding rows store no
    K/V (slot -1) and attend to one key of block 0."""
    layout = StagingLayout(bucket, position_rows, plan.block_table_width, len(plan.placeholder_rows))
    n, b = len(plan.input_ids), bucket
    host[:n] = plan.input_ids
    host[n:b] = 0
    positions = plan.mrope_positions if plan.mrope_positions is not None else [plan.positions]
    for axis, row in enumerate(positions):
        start = layout.positions + axis * b
        host[start:start + n] = row
        host[start + n:start + b] = 0
    slots, seq_lens, order = layout.slots, layout.seq_lens, layout.seq_order
    host[slots:slots + n] = plan.slot_array()
    host[slots + n:slots + b] = -1
    host[seq_lens:seq_lens + n] = plan.seq_lens
    host[seq_lens + n:seq_lens + b] = 1
    host[order:order + b] = longest_first(host[seq_lens:seq_lens + b])
    table_view = host[layout.tables:layout.tables + b * layout.width].reshape(b, layout.width)
    table_view[:n] = plan.table_array()
    table_view[n:] = 0
    sources = host[layout.sources:layout.end]
    sources[:] = -1
    sources[plan.placeholder_rows] = plan.placeholder_sources
    return layout
