"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start-up.

A decode step (one new token per sequence, no encoder rows) of B sequences replays the graph of
the smallest bucket >= B. Its inputs are copied into static buffers first (one host-to-device copy
from pinned memory); the rows past B are padding: their K/V store is skipped (slot -1) and they
attend to one key of block 0, and their output is dropped. The attention launch is sized for
max_model_len, so a graph serves every context length.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from streamvlm.protocol import StepPlan
from workers.layers.attention import AttentionMetadata

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
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int64, device=device)
        # ids, positions, slots, seq_lens, then the block tables: one pinned staging buffer.
        self._staging = torch.zeros((3 + self.position_rows) * n + n * self.max_blocks, dtype=torch.int64).pin_memory()
        self.buckets = batch_buckets(max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        meta = AttentionMetadata(query_lens=[1] * b, seq_lens=[self.max_model_len] * b,
                                 slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                 block_size=self.block_size)
        self.backend.prepare_decode_graph(meta, self.seq_lens[:b])
        return meta

    def _positions(self, b: int) -> torch.Tensor:
        return self.positions[:, :b] if self.position_rows == 3 else self.positions[0, :b]

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):   # the largest first: the smaller ones reuse its memory
            meta = self._meta(b)
            self.metas[b] = meta
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):   # warm-up: Triton compiles, launch plans and workspaces exist
                    self.model(self.input_ids[:b], self._positions(b), meta)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[b] = self.model(self.input_ids[:b], self._positions(b), meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("CUDA graphs: %d decode batch sizes up to %d captured in %.1f s (%.0f MiB)",
                    len(self.buckets), self.max_batch, time.monotonic() - start, used / 2**20)

    def can_run(self, plan: StepPlan) -> bool:
        n = len(plan.input_ids)
        return (0 < n <= self.max_batch and not plan.mm_rows and len(plan.query_lens) == n
                and max(plan.seq_lens) <= self.max_model_len)

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode step (can_run(plan) is true)."""
        n = len(plan.input_ids)
        b = next(size for size in self.buckets if size >= n)
        pad = b - n
        positions = plan.mrope_positions if plan.mrope_positions is not None else [plan.positions]
        width = len(plan.block_tables[0])
        flat: list[int] = list(plan.input_ids) + [0] * pad
        for row in positions:
            flat += row + [0] * pad
        flat += plan.slot_mapping + [-1] * pad
        flat += plan.seq_lens + [1] * pad
        tables = [t for row in plan.block_tables for t in row] + [0] * (pad * width)
        staging = self._staging[:len(flat) + len(tables)]
        staging.copy_(torch.tensor(flat + tables, dtype=torch.int64))
        device_copy = staging.to(self.device, non_blocking=True)
        rows = self.position_rows
        self.input_ids[:b].copy_(device_copy[:b])
        self.positions[:, :b].copy_(device_copy[b:(1 + rows) * b].view(rows, b))
        self.slot_mapping[:b].copy_(device_copy[(1 + rows) * b:(2 + rows) * b])
        self.seq_lens[:b].copy_(device_copy[(2 + rows) * b:(3 + rows) * b])
        self.block_tables[:b, :width].copy_(device_copy[(3 + rows) * b:].view(b, width))
        self.graphs[b].replay()
        return self.outputs[b][:n]
