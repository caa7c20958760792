"""Run one of our model classes directly (no scheduler, no engine): a single-sequence prefill
over a freshly allocated paged KV cache, for model-level tests against transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.layers.attention_base import AttentionMetadata
from workers.layers.attention_torch import TorchAttentionBackend
from workers.loader import load_model
from streamvlm.contract.model_source import resolve_model


def load_ours(path: str | Path, max_model_len: int = 512) -> torch.nn.Module:
    source = resolve_model(str(path))
    return load_model(source, "auto", max_model_len, torch.device("cpu"), torch.float32)


@torch.inference_mode()
def prefill_logits(model: torch.nn.Module, input_ids: list[int], positions: torch.Tensor,
                   mm=None, block_size: int = 16) -> torch.Tensor:
    """Logits [len(input_ids), vocab] of one prompt, computed in one step."""
    n = len(input_ids)
    num_blocks = -(-n // block_size)
    args = model.args
    backend = TorchAttentionBackend()
    cache = torch.zeros(args.num_layers, 2, num_blocks, block_size, model.shard.num_kv_heads,
                        args.head_dim)
    for i, attn in enumerate(model.attention_layers):
        attn.backend, attn.k_cache, attn.v_cache = backend, cache[i, 0], cache[i, 1]
    meta = AttentionMetadata(query_lens=[n], seq_lens=[n],
                             slot_mapping=torch.arange(n, dtype=torch.int64),
                             block_tables=torch.arange(num_blocks, dtype=torch.int64)[None],
                             block_size=block_size)
    backend.prepare(meta)
    ids = torch.tensor(input_ids, dtype=torch.int64)
    hidden = model(ids, positions, meta, mm) if mm is not None else model(ids, positions, meta)
    return model.compute_logits(hidden).float()
