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
        # Decode launches are sized for max_model_len and split contexts into partitions of a size that
        # depends on neither the batch nor the step: eager steps and CUDA graph replays of any batch run the
        # same reduction, so they give the same numbers. None: split as far as a single sequence needs to
        # fill the device.
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
        step = TritonStep(decode_only=decode_only, max_seq_len=max(meta.seq_lens), query_lens=query_lens,
                          seq_lens=seq_lens_t, cu_seqlens_q=cu_seqlens_t, seq_order=order_t)
        for shape in self._head_shapes:
            self._plan(step, shape, device)
        meta.prepared = step

    def prepare_decode_graph(self, meta: AttentionMetadata, seq_lens: torch.Tensor,
                             seq_order: torch.Tensor) -> None:
        """A decode step whose tensors stay put across CUDA graph replays: seq_lens and seq_order [num_seqs]
        int32 are the caller's static buffers (seq_order: the rows by decreasing seq_len). The split-K launch
        covers max_model_len (partitions past a sequence's length exit at once), so one capture serves every
        context length."""
        num_seqs = seq_lens.shape[0]
        step = TritonStep(decode_only=True, max_seq_len=self.max_model_len, query_lens=[1] * num_seqs,
                          seq_lens=seq_lens,
                          cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=seq_lens.device),
                          seq_order=seq_order)
        for shape in self._head_shapes:
            self._plan(step, shape, seq_lens.device)
        meta.prepared = step

    def _plan(self, step: TritonStep, shape: HeadShape, device: torch.device) -> None:
        num_heads, num_kv_heads, head_dim = shape
        num_seqs = len(step.query_lens)
        if step.decode_only:
            # Planned for the batch rounded up to a power of two: every CUDA graph bucket lies between the
            # same powers of two as the batches it serves, so eager steps and replays split alike.
            partitions = plan_decode_partitions(triton.next_power_of_2(num_seqs), num_kv_heads, self.max_model_len,
                                                head_dim, self._decode_programs, self.decode_partition_size)
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
