"""Attention backend on FlashAttention 4 (`flash_attn.cute`, PyPI package flash-attn-4; CUDA,
Hopper and newer, bfloat16 / float16) for prefill chunks, and our Triton split-K kernel for decode.

FA4's varlen forward reads the paged KV cache through the block table (`page_table`), each chunk
attending to its cached prefix. Decode rows take the Triton kernel (and its CUDA graphs) instead:
`python benchmarks/attention.py` on an H200 (Qwen3-8B heads, blocks of 16) gave it 6.4 against
11.7 us a layer at batch 1, 194 against 260 at batch 256, where FA4 prefill ran 2.4 times as fast
as our Triton prefill kernel (75 against 183 us for a 2,048-token prompt). A step's leading run of
one-token sequences (the scheduler puts decodes first) goes to the decode kernel, the rest to FA4.

FA4 compiles its kernels at run time (the CUTLASS DSL): each new variant (head shape, dtype) costs
a few seconds on first use, which the start-up warm-up takes.

Imports flash_attn.cute and triton: import this module only once this backend was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flash_attn.cute import flash_attn_varlen_func

from workers.kernels.index_arrays import varlen_index_arrays
from workers.layers.attention_base import AttentionMetadata
from workers.layers.attention_triton import StoresKVWithTriton, TritonAttentionBackend


@dataclass
class FlashPrefill:
    """FA4's share of a step: the sequences after the leading decodes."""
    first_token: int             # rows of q before it belong to the decodes
    cu_seqlens_q: torch.Tensor   # [num_seqs + 1] int32, from first_token
    seq_lens: torch.Tensor       # [num_seqs] int32: keys per sequence, cached and new
    page_table: torch.Tensor     # [num_seqs, max_blocks] int32
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class FlashStep:
    decode: AttentionMetadata | None   # the leading decodes, prepared for the Triton backend
    prefill: FlashPrefill | None


def check_head_dim(head_dim: int) -> None:
    if head_dim % 8 or not 8 <= head_dim <= 256:
        raise ValueError(f"attention_backend='flash_attn' needs a head_dim that is a multiple of 8 "
                         f"up to 256, not {head_dim}")


def leading_decodes(query_lens: list[int]) -> int:
    """How many sequences at the front of the step have one query token each."""
    count = 0
    while count < len(query_lens) and query_lens[count] == 1:
        count += 1
    return count


class FlashAttnBackend(StoresKVWithTriton):
    name = "flash_attn"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, max_model_len: int) -> None:
        self.device = device
        self.max_model_len = max_model_len
        self.decode_backend = TritonAttentionBackend(device, max_model_len)
        self._checked_head_dims: set[int] = set()

    def prepare(self, meta: AttentionMetadata) -> None:
        num_decodes = leading_decodes(meta.query_lens)
        decode = prefill = None
        if num_decodes:
            decode = AttentionMetadata(meta.query_lens[:num_decodes], meta.seq_lens[:num_decodes],
                                       meta.slot_mapping[:num_decodes], meta.block_tables[:num_decodes],
                                       meta.block_size)
            self.decode_backend.prepare(decode)
        if num_decodes < len(meta.query_lens):
            query_lens, seq_lens = meta.query_lens[num_decodes:], meta.seq_lens[num_decodes:]
            seq_lens_t, cu_seqlens, _ = varlen_index_arrays(query_lens, seq_lens, meta.slot_mapping.device)
            prefill = FlashPrefill(num_decodes, cu_seqlens, seq_lens_t, _int32_table(meta.block_tables[num_decodes:]),
                                   max(query_lens), max(seq_lens))
        meta.prepared = FlashStep(decode, prefill)

    def decode_graph_spans(self, num_seqs: int) -> list[int]:
        return self.decode_backend.decode_graph_spans(num_seqs)

    def prepare_decode_graph(self, meta: AttentionMetadata, seq_lens: torch.Tensor,
                             seq_order: torch.Tensor) -> None:
        """CUDA-graph decode: the Triton decode kernel over the caller's static buffers."""
        decode = AttentionMetadata(meta.query_lens, meta.seq_lens, meta.slot_mapping, meta.block_tables,
                                   meta.block_size)
        self.decode_backend.prepare_decode_graph(decode, seq_lens, seq_order)
        meta.prepared = FlashStep(decode, None)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if q.shape[-1] not in self._checked_head_dims:
            check_head_dim(q.shape[-1])
            self._checked_head_dims.add(q.shape[-1])
        step: FlashStep = meta.prepared
        parts = []
        if step.decode is not None:
            rows = len(step.decode.query_lens)
            parts.append(self.decode_backend.attend(q[:rows], k_cache, v_cache, step.decode, scale))
        if step.prefill is not None:
            p = step.prefill
            # Causal masks are aligned bottom-right: query i of a sequence with n queries and s keys
            # sees keys up to s - n + i, its own position.
            out, _ = flash_attn_varlen_func(
                q[p.first_token:].contiguous(), k_cache, v_cache, cu_seqlens_q=p.cu_seqlens_q, seqused_k=p.seq_lens,
                page_table=p.page_table, max_seqlen_q=p.max_seqlen_q, max_seqlen_k=p.max_seqlen_k,
                softmax_scale=scale, causal=True, num_splits=1)   # split-KV is not built for SM90
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _int32_table(block_tables: torch.Tensor) -> torch.Tensor:
    table = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    return table.contiguous()
