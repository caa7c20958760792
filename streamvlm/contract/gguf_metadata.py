"""A GGUF file's metadata read as a Hugging Face config dict, with numpy and the ``gguf``
package only (no torch): the engine core reads a GGUF model's settings with it, and the
workers' loader takes the tensors from the same reader."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from streamvlm.contract.families import ARCHITECTURE_BY_GGUF_ARCH


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """A tensor as float32 numpy in torch's dimension order."""
    # GGUF lists dims innermost first (ne0 = columns); torch lists them outermost first.
    shape = tuple(int(d) for d in reversed(t.shape))
    return dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)


@dataclass
class GGUFMetadata:
    """A GGUF file's settings as a Hugging Face config dict, and its reader (which maps the
    tensors lazily, for the workers' loader)."""

    path: str
    config: dict[str, Any]
    reader: GGUFReader = field(repr=False)


def read_gguf_metadata(path: str) -> GGUFMetadata:
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    reader = GGUFReader(path)
    arch = _get(reader, "general.architecture")
    if arch not in ARCHITECTURE_BY_GGUF_ARCH:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {path}; "
                         f"supported: {', '.join(ARCHITECTURE_BY_GGUF_ARCH)}")
    return GGUFMetadata(path=path, config=_build_config(reader, arch), reader=reader)


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
        "architectures": [ARCHITECTURE_BY_GGUF_ARCH[arch]],
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
        rope.update(_llama3_rope(dequantize_tensor(tensors["rope_freqs.weight"]), theta, head_dim))
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
