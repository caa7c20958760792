"""Attention backend on our Triton kernels over the paged KV cache (CUDA; on CPU only under TRITON_INTERPRET=1).

Imports triton: import this module only once the Triton backend was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from workers.kernels.index_arrays import varlen_index_arrays
from workers.kernels.kv_store import store_kv_cache
from workers.kernels.paged_attention import (
    DecodePartitions,
    DecodeWorkspace,
    PrefillLaunch,
    decode_workspace,
    default_decode_programs,
    paged_decode_attention,
    paged_prefill_attention,
    plan_decode_partitions,
    plan_prefill,
)
from workers.layers.attention_base import AttentionMetadata

LONGEST_FIRST = True
# Decode launches cover the step's longest context rounded up to a power of two of at least this many keys
# (or max_model_len), not max_model_len: the programs of partitions past every context only exit, but each
# still starts. On an H200 (Qwen3-8B, batch 1, 256 keys, graph step) max_model_len 512 against 4,096:
# 3.642 / 3.650 ms against 3.718 / 3.702.
MIN_DECODE_SPAN = 512

# (num_heads, num_kv_heads, head_dim) of a layer: what the launch plans depend on beyond the step itself.
HeadShape = tuple[int, int, int]


@dataclass
class _DecodePlan:
    partitions: DecodePartitions
    workspace: DecodeWorkspace | None


@dataclass
class TritonStep:
    """What the kernels need for one step, built by prepare() and shared by every layer."""
    decode_only: bool               # every sequence has one query token: the split-K decode kernel
    max_seq_len: int
    query_lens: list[int]
    seq_lens: torch.Tensor          # [num_seqs] int32
    cu_seqlens_q: torch.Tensor      # [num_seqs + 1] int32
    seq_order: torch.Tensor | None = None   # decode: [num_seqs] int32, the sequences longest first
    decode_plans: dict[HeadShape, _DecodePlan] = field(default_factory=dict)
    prefill_plans: dict[HeadShape, list[PrefillLaunch]] = field(default_factory=dict)


class StoresKVWithTriton:
    """forward() for backends over the paged cache: our Triton KV store, then the backend's attend()."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)


class TritonAttentionBackend(StoresKVWithTriton):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, max_model_len: int, decode_partition_size: int | None = None) -> None:
        self.device = device
        # Decode launches split contexts into partitions of a size that depends on the batch's power of two and
        # max_model_len only, never on the contexts: eager steps and CUDA graph replays of a batch run the same
        # reduction, so they give the same numbers. None: split as far as a single sequence needs to fill the
        # device. A launch covers the step's decode span (decode_span) of such partitions.
        self.max_model_len = max_model_len
        self.decode_partition_size = decode_partition_size
        self._decode_programs = default_decode_programs(device)
        # Decode programs start with the longest contexts: with one program per (sequence, kv head), one
        # long sequence started last would run alone at the end of the launch.
        self.longest_first = LONGEST_FIRST
        # Head shapes seen in forward(): prepare() plans for them up front, so that forward() copies nothing
        # to the device (only the very first step plans lazily).
        self._head_shapes: set[HeadShape] = set()

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        query_lens = list(meta.query_lens)
        decode_only = all(n == 1 for n in query_lens)
        seq_lens_t, cu_seqlens_t, order_t = varlen_index_arrays(query_lens, meta.seq_lens, device,
                                                                with_order=decode_only)
        max_seq_len = max(meta.seq_lens)
        step = TritonStep(decode_only=decode_only, max_seq_len=decode_span(max_seq_len, self.max_model_len)
                          if decode_only else max_seq_len, query_lens=query_lens,
                          seq_lens=seq_lens_t, cu_seqlens_q=cu_seqlens_t, seq_order=order_t)
        for shape in self._head_shapes:
            self._plan(step, shape, device)
        meta.prepared = step

    def prepare_decode_graph(self, meta: AttentionMetadata, seq_lens: torch.Tensor,
                             seq_order: torch.Tensor) -> None:
        """A decode step whose tensors stay put across CUDA graph replays: seq_lens and seq_order [num_seqs]
        int32 are the caller's static buffers (seq_order: the rows by decreasing seq_len). The split-K launch
        covers the decode span of max(meta.seq_lens) (one of decode_graph_spans()): a capture serves every
        step whose contexts are that long or shorter."""
        num_seqs = seq_lens.shape[0]
        step = TritonStep(decode_only=True, max_seq_len=decode_span(max(meta.seq_lens), self.max_model_len),
                          query_lens=[1] * num_seqs,
                          seq_lens=seq_lens,
                          cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=seq_lens.device),
                          seq_order=seq_order)
        for shape in self._head_shapes:
            self._plan(step, shape, seq_lens.device)
        meta.prepared = step

    def decode_graph_spans(self, num_seqs: int) -> list[int]:
        """The decode spans worth a CUDA graph each at this batch size, ascending, the last max_model_len: of
        the spans whose launches are alike for every head shape seen, the longest (with one partition, all)."""
        by_launch: dict[tuple[int, ...], int] = {}
        for span in decode_spans(self.max_model_len):
            launch = tuple(self._decode_partitions(num_seqs, shape).covering(span).num_partitions
                           for shape in sorted(self._head_shapes))
            by_launch[launch] = span
        return sorted(by_launch.values())

    def _decode_partitions(self, num_seqs: int, shape: HeadShape) -> DecodePartitions:
        # Planned for the batch rounded up to a power of two: every CUDA graph bucket lies between the same
        # powers of two as the batches it serves, so eager steps and replays split alike.
        _, num_kv_heads, head_dim = shape
        return plan_decode_partitions(triton.next_power_of_2(num_seqs), num_kv_heads, self.max_model_len,
                                      head_dim, self._decode_programs, self.decode_partition_size)

    def _plan(self, step: TritonStep, shape: HeadShape, device: torch.device) -> None:
        num_heads, num_kv_heads, head_dim = shape
        num_seqs = len(step.query_lens)
        if step.decode_only:
            partitions = self._decode_partitions(num_seqs, shape).covering(step.max_seq_len)
            workspace = None
            if partitions.num_partitions > 1:
                workspace = decode_workspace(num_seqs, num_heads, num_kv_heads, head_dim, partitions.num_partitions,
                                             device)
            step.decode_plans[shape] = _DecodePlan(partitions, workspace)
        else:
            step.prefill_plans[shape] = plan_prefill(step.query_lens, num_heads // num_kv_heads, head_dim, device)

    def _ordered(self, plan: _DecodePlan) -> bool:
        """Longest first pays where a program holds a whole context; split contexts make programs of at most
        a partition each, and there the order's extra dependent load only adds latency (on an H200, 16
        sequences of 700 keys: 21.2 us ordered against 18.9 us, `benchmarks/attention.py`)."""
        return self.longest_first and plan.partitions.num_partitions == 1

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        step: TritonStep = meta.prepared
        shape = (q.shape[1], k_cache.shape[2], q.shape[2])
        plans = step.decode_plans if step.decode_only else step.prefill_plans
        if shape not in plans:
            self._head_shapes.add(shape)
            self._plan(step, shape, q.device)
        if step.decode_only:
            plan = step.decode_plans[shape]
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, step.seq_lens, scale,
                                          step.max_seq_len, partitions=plan.partitions, workspace=plan.workspace,
                                          seq_order=step.seq_order if self._ordered(plan) else None)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, step.seq_lens, step.cu_seqlens_q,
                                       scale, step.prefill_plans[shape])


def decode_spans(max_model_len: int) -> list[int]:
    """The context lengths decode launches are sized for: powers of two from MIN_DECODE_SPAN below
    max_model_len, then max_model_len."""
    spans, span = [], MIN_DECODE_SPAN
    while span < max_model_len:
        spans.append(span)
        span *= 2
    return spans + [max_model_len]


def decode_span(max_seq_len: int, max_model_len: int) -> int:
    """The decode span a step whose longest context has max_seq_len keys launches for."""
    return next((span for span in decode_spans(max_model_len) if span >= max_seq_len), max_seq_len)
