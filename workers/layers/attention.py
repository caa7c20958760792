"""Attention over the paged KV cache, behind a backend interface.

A step's tokens are one flat batch: sequence b contributes query_lens[b] tokens at positions
[seq_lens[b] - query_lens[b], seq_lens[b]); its keys and values live in the blocks of
block_tables[b]. Backends store the step's new K/V into the cache (slot_mapping) and attend
(forward), or attend only (attend), where the caller's rotary kernel has stored K/V already. Every
backend reads the same cache layout: [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor        # [num_tokens] int64: where each new token's K/V goes
    block_tables: torch.Tensor        # [num_seqs, max_blocks] int64, padded with 0
    block_size: int
    # Filled by the backend's prepare(); shared by every layer of the step.
    prepared: object = None


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> None: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor: ...

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


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


BACKENDS = ("auto", "torch", "triton", "flash_attn")


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def flash_attn_available(device: torch.device) -> bool:
    """FlashAttention 4 (flash_attn.cute) importable, with triton, on a Hopper or newer GPU."""
    import importlib.util

    if device.type != "cuda" or not _triton_available() or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        if importlib.util.find_spec("flash_attn.cute") is None:
            return False
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def resolve_backend_name(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend "auto" stands for: on CUDA, flash_attn (FlashAttention 4 prefill, Triton decode)
    where FA4 is importable, the GPU is Hopper or newer and dtype is 16-bit; else our Triton kernels
    where triton is importable; else (and on CPU) the torch backend. Other names stay as they are."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; available: {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if device.type != "cuda" or not _triton_available():
        return "torch"
    if dtype in (torch.bfloat16, torch.float16) and flash_attn_available(device):
        return "flash_attn"
    return "triton"


def get_attention_backend(name: str, device: torch.device, max_model_len: int,
                          dtype: torch.dtype) -> AttentionBackend:
    """The backend of that name (or the one "auto" resolves to), or a ValueError saying why the
    device cannot run it."""
    name = resolve_backend_name(name, device, dtype)
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device")
    if not _triton_available():
        raise ValueError(f"attention_backend={name!r} needs the triton package")
    if name == "flash_attn":
        if not flash_attn_available(device):
            raise ValueError("attention_backend='flash_attn' needs FlashAttention 4 (pip install flash-attn-4) "
                             "and a GPU of compute capability 9.0 or newer")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"attention_backend='flash_attn' needs bfloat16 or float16, not {dtype}")
        from workers.layers.attention_flash import FlashAttnBackend

        return FlashAttnBackend(device, max_model_len)
    from workers.layers.attention_triton import TritonAttentionBackend

    return TritonAttentionBackend(device, max_model_len)
