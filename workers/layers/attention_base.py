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
