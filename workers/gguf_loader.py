"""Read a llama.cpp GGUF checkpoint as a Hugging Face config dict plus float32 tensors."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

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
    path: str
    config: dict[str, Any]
    _reader: GGUFReader = field(repr=False)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor) one at a time, dequantized and in torch layout."""
        permute_heads = {"attn_q": self.config["num_attention_heads"],
                         "attn_k": self.config["num_key_value_heads"]}
        is_llama = self.config["model_type"] == "llama"
        for t in self._reader.tensors:
            if t.name in _NON_PARAMETERS:
                continue
            name = hf_name(t.name)
            arr = _dequantize(t)
            part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if is_llama and part in permute_heads:
                arr = _unpermute_rope(arr, permute_heads[part])
            if not arr.flags.writeable:  # F32/F16 views into the read-only memmap
                arr = arr.copy()
            yield name, torch.from_numpy(arr)


def _dequantize(t: ReaderTensor) -> np.ndarray:
    # GGUF lists dims innermost first (ne0 = columns); torch lists them outermost first.
    shape = tuple(int(d) for d in reversed(t.shape))
    return dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)


def read_gguf(path: str) -> GGUFCheckpoint:
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    reader = GGUFReader(path)
    arch = _get(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path}; "
                         f"supported: {', '.join(_ARCHITECTURES)}")
    return GGUFCheckpoint(path=path, config=_build_config(reader, arch), _reader=reader)


def _get(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _build_config(reader: GGUFReader, arch: str) -> dict[str, Any]:
    def a(key: str, default: Any = None) -> Any:
        return _get(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = a("embedding_length")
    heads = a("attention.head_count")
    head_dim = a("attention.key_length", hidden // heads)
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])
    elif (tokens := reader.fields.get("tokenizer.ggml.tokens")) is not None:
        vocab = len(tokens.data)
    else:
        vocab = a("vocab_size")

    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        # head_count_kv may be absent (plain MHA); it is a per-layer array in hybrid models.
        "num_key_value_heads": a("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": a("context_length"),
        "rope_parameters": _rope_parameters(reader, arch, head_dim, tensors),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        "torch_dtype": "float32",
    }
    for tok in ("bos", "eos", "padding"):
        if (tid := _get(reader, f"tokenizer.ggml.{tok}_token_id")) is not None:
            config["pad_token_id" if tok == "padding" else f"{tok}_token_id"] = tid
    return config


def _rope_parameters(reader: GGUFReader, arch: str, head_dim: int,
                     tensors: dict[str, ReaderTensor]) -> dict[str, Any]:
    def a(key: str) -> Any:
        return _get(reader, f"{arch}.rope.{key}")

    theta = float(a("freq_base") or 10000.0)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = a("scaling.type")
    if scaling and scaling != "none":
        rope["rope_type"] = scaling
        for gguf_key, hf_key in (("scaling.factor", "factor"),
                                 ("scaling.original_context_length",
                                  "original_max_position_embeddings"),
                                 ("scaling.attn_factor", "attention_factor"),
                                 ("scaling.yarn_beta_fast", "beta_fast"),
                                 ("scaling.yarn_beta_slow", "beta_slow")):
            if (v := a(gguf_key)) is not None:
                rope[hf_key] = v
    elif "rope_freqs.weight" in tensors:
        rope.update(_llama3_rope(_dequantize(tensors["rope_freqs.weight"]), theta, head_dim))
    return rope


def _llama3_rope(freq_factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover HF "llama3" rope parameters from llama.cpp's precomputed rope_freqs tensor.

    llama.cpp stores only the per-frequency divisor r. Between the two cutoff wavelengths,
    1/r = (1 - s)/factor + s with s = (C/wavelen - low)/(high - low), so s is linear in
    1/wavelen; (C, low, high) are fixed only up to a common scale, so pin low = 1 (every
    Llama 3.x release) and fit C and high from the smoothed band.
    """
    r = freq_factors.astype(np.float64)
    factor = float(r.max())
    if factor <= 1.0:
        return {}
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = wavelen[: len(r)]
    band = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    if band.sum() < 2:
        raise ValueError("cannot recover llama3 rope scaling from rope_freqs: "
                         f"{int(band.sum())} smoothed frequencies, need 2")
    s = (1 / r[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[band], s, 1)
    high = 1 - 1 / intercept
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": float(high),
            "original_max_position_embeddings": int(round(-slope / intercept))}
