"""Read a llama.cpp GGUF checkpoint's tensors as float32 torch tensors under Hugging Face
names; its config comes from the contract's torch-free metadata reader."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamvlm.contract.gguf_metadata import GGUFMetadata, dequantize_tensor, read_gguf_metadata

_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Precomputed rope frequency factors, not parameters: folded into config["rope_parameters"].
_NON_PARAMETERS = frozenset({"rope_freqs.weight"})

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its Hugging Face parameter name."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    elif (m := _GLOBAL_RE.fullmatch(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's rows from HF's half-split rotary layout to
    # interleaved pairs (row 2i, 2i+1 = HF rows i, i + d/2); undo that per head.
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFCheckpoint:
    metadata: GGUFMetadata

    @property
    def config(self) -> dict[str, Any]:
        return self.metadata.config

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor) one at a time, dequantized and in torch layout."""
        permute_heads = {"attn_q": self.config["num_attention_heads"],
                         "attn_k": self.config["num_key_value_heads"]}
        is_llama = self.config["model_type"] == "llama"
        for t in self.metadata.reader.tensors:
            if t.name in _NON_PARAMETERS:
                continue
            name = hf_name(t.name)
            arr = dequantize_tensor(t)
            part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if is_llama and part in permute_heads:
                arr = _unpermute_rope(arr, permute_heads[part])
            if not arr.flags.writeable:  # F32/F16 views into the read-only memmap
                arr = arr.copy()
            yield name, torch.from_numpy(arr)


def read_gguf(path: str) -> GGUFCheckpoint:
    return GGUFCheckpoint(read_gguf_metadata(path))
