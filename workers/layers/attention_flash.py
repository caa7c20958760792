"""Attention backend on FlashAttention 4 (`flash_attn.cute`, PyPI package flash-attn-4; CUDA,
Hopper and newer, bfloat16 / float16): its varlen forward reads the paged KV cache through the
block table (`page_table`), for prefill chunks over their cached prefix and for decode alike. The
step's new keys and values go into the cache through our Triton store kernel.

FA4 compiles its kernels at run time (the CUTLASS DSL): each new variant (decode or prefill, head
shape, dtype) costs a few seconds on first use, which the start-up warm-up and graph capture take.

Imports flash_attn.cute and triton: import this module only once this backend was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flash_attn.cute import flash_attn_varlen_func

from workers.kernels.index_arrays import varlen_index_arrays
from workers.kernels.kv_store import store_kv_cache
from workers.layers.attention import AttentionMetadata

@dataclass
class FlashStep:
    cu_seqlens_q: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor       # [num_seqs] int32: keys per sequence, cached and new
    page_table: torch.Tensor     # [num_seqs, max_blocks] int32
    max_seqlen_q: int
    max_seqlen_k: int


def check_head_dim(head_dim: int) -> None:
    if head_dim % 8 or not 8 <= head_dim <= 256:
        raise ValueError(f"attention_backend='flash_attn' needs a head_dim that is a multiple of 8 "
                         f"up to 256, not {head_dim}")


class FlashAttnBackend:
    name = "flash_attn"
    supports_cuda_graphs = True
    # FA4 takes an int32 page table: CUDA-graph decode keeps its static tables in int32, since a
    # conversion made when the graph step is prepared (before capture) would never see new tables.
    block_table_dtype = torch.int32

    def __init__(self, device: torch.device, max_model_len: int) -> None:
        self.device = device
        self.max_model_len = max_model_len
        self._checked_head_dims: set[int] = set()

    def prepare(self, meta: AttentionMetadata) -> None:
        seq_lens, cu_seqlens = varlen_index_arrays(meta.query_lens, meta.seq_lens, meta.slot_mapping.device)
        meta.prepared = FlashStep(cu_seqlens, seq_lens, _int32_table(meta.block_tables),
                                  max(meta.query_lens), max(meta.seq_lens))

    def prepare_decode_graph(self, meta: AttentionMetadata, seq_lens: torch.Tensor) -> None:
        """A decode step whose tensors stay put across CUDA graph replays (seq_lens and the block
        tables are the caller's static buffers); the launch covers max_model_len keys."""
        num_seqs = seq_lens.shape[0]
        tables = meta.block_tables
        if tables.dtype != torch.int32 or not tables.is_contiguous():
            raise ValueError(f"CUDA-graph block tables for flash_attn must be contiguous int32, not {tables.dtype}")
        cu_seqlens = torch.arange(num_seqs + 1, dtype=torch.int32, device=seq_lens.device)
        meta.prepared = FlashStep(cu_seqlens, seq_lens, tables, 1, self.max_model_len)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if q.shape[-1] not in self._checked_head_dims:
            check_head_dim(q.shape[-1])
            self._checked_head_dims.add(q.shape[-1])
        step: FlashStep = meta.prepared
        # Causal masks are aligned bottom-right: query i of a sequence with n queries and s keys
        # sees keys up to s - n + i, its own position.
        out, _ = flash_attn_varlen_func(
            q.contiguous(), k_cache, v_cache, cu_seqlens_q=step.cu_seqlens_q, seqused_k=step.seq_lens,
            page_table=step.page_table, max_seqlen_q=step.max_seqlen_q, max_seqlen_k=step.max_seqlen_k,
            softmax_scale=scale, causal=True, num_splits=1)   # split-KV is not built for SM90
        return out


def _int32_table(block_tables: torch.Tensor) -> torch.Tensor:
    table = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    return table.contiguous()
