"""The portable attention backend (CPU and CUDA) on torch's scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.layers.attention_base import AttentionMetadata


@dataclass
class _PaddedBatch:
    query_index: torch.Tensor   # [B, max_q]: flat token index of each padded query row
    key_slots: torch.Tensor     # [B, max_k]: cache slot of each padded key column
    mask: torch.Tensor          # [B, 1, max_q, max_k] bool: may attend
    valid_rows: torch.Tensor    # [num_tokens]: rows of the flattened [B * max_q] output to keep


class TorchAttentionBackend:
    """Portable backend (CPU and CUDA): gathers each sequence's keys into a padded batch and
    calls scaled_dot_product_attention with an explicit causal mask."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        num_seqs = len(meta.query_lens)
        max_q, max_k = max(meta.query_lens), max(meta.seq_lens)
        query_lens = torch.tensor(meta.query_lens, device=device)
        seq_lens = torch.tensor(meta.seq_lens, device=device)
        starts = torch.cumsum(query_lens, 0) - query_lens
        q_offsets = torch.arange(max_q, device=device)
        k_positions = torch.arange(max_k, device=device)
        row_valid = q_offsets[None, :] < query_lens[:, None]                  # [B, max_q]
        query_index = torch.where(row_valid, starts[:, None] + q_offsets[None, :], 0)
        q_positions = (seq_lens - query_lens)[:, None] + q_offsets[None, :]   # [B, max_q]
        mask = k_positions[None, None, :] <= q_positions[:, :, None]
        # Padded query rows attend to key 0 so that softmax stays finite; they are dropped.
        mask = torch.where(row_valid[:, :, None], mask, k_positions[None, None, :] == 0)
        blocks = meta.block_tables[:, k_positions // meta.block_size]         # [B, max_k]
        key_slots = blocks * meta.block_size + k_positions[None, :] % meta.block_size
        valid_rows = (torch.arange(num_seqs, device=device)[:, None] * max_q + q_offsets[None, :])
        meta.prepared = _PaddedBatch(query_index, key_slots, mask[:, None], valid_rows[row_valid])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[-2:]
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, head_dim)
        batch: _PaddedBatch = meta.prepared
        qp = q[batch.query_index].transpose(1, 2)             # [B, H, max_q, D]
        kp = flat_k[batch.key_slots].transpose(1, 2)          # [B, Hkv, max_k, D]
        vp = flat_v[batch.key_slots].transpose(1, 2)
        num_heads = q.shape[1]
        if num_heads != num_kv_heads:
            kp = kp.repeat_interleave(num_heads // num_kv_heads, dim=1)
            vp = vp.repeat_interleave(num_heads // num_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=batch.mask, scale=scale)
        out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)
        return out[batch.valid_rows]
