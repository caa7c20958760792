"""Rotary position embeddings (NeoX / HF-Llama layout), matching transformers' math."""

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
DEFAULT_ROPE_THETA = 10000.0


def rope_parameters_from_config(hf_config: dict) -> dict:
    """Normalise old (`rope_theta` + `rope_scaling`) and new (`rope_parameters`) config.json styles."""
    # transformers lets a non-empty `rope_scaling` win over `rope_parameters`.
    raw = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    params: dict[str, Any] = dict(raw)
    rope_type = params.pop("type", None)
    rope_type = params.get("rope_type") or rope_type or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"Unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    params["rope_type"] = rope_type

    theta = params.get("rope_theta")
    if theta is None:
        theta = hf_config.get("rope_theta")
    params["rope_theta"] = float(theta if theta is not None else DEFAULT_ROPE_THETA)

    partial = params.get("partial_rotary_factor")
    if partial is None:
        partial = hf_config.get("partial_rotary_factor")
    params["partial_rotary_factor"] = float(partial if partial is not None else 1.0)

    if rope_type in ("yarn", "llama3"):
        # As transformers does: a top-level value (Phi3 style) wins, else fall back to max_position_embeddings.
        if hf_config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = hf_config["original_max_position_embeddings"]
        elif params.get("original_max_position_embeddings") is None and "max_position_embeddings" in hf_config:
            params["original_max_position_embeddings"] = hf_config["max_position_embeddings"]
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim))


def _llama3_inv_freq(base: float, dim: int, p: dict, max_position_embeddings: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor = p["factor"]
    low_freq_factor = p["low_freq_factor"]
    high_freq_factor = p["high_freq_factor"]
    old_context_len = p.get("original_max_position_embeddings") or max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _yarn_inv_freq(base: float, dim: int, p: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original_max = p.get("original_max_position_embeddings") or max_position_embeddings
    factor = p.get("factor")
    if factor is None:
        factor = max_position_embeddings / original_max

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _inv_freq_and_scaling(
    p: dict, dim: int, max_position_embeddings: int, max_model_len: int
) -> tuple[torch.Tensor, float]:
    rope_type = p.get("rope_type") or p.get("type") or "default"
    base = float(p.get("rope_theta", DEFAULT_ROPE_THETA))
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / p["factor"], 1.0
    if rope_type == "dynamic":
        # Fixed scaling for max_model_len (as vLLM does): a paged KV cache cannot re-rotate cached keys.
        if max_model_len <= max_position_embeddings:
            return _base_inv_freq(base, dim), 1.0
        factor = p["factor"]
        base = base * ((factor * max_model_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(base, dim, p, max_position_embeddings), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, dim, p, max_position_embeddings)
    raise ValueError(f"Unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(torch.nn.Module):
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def __init__(
        self, head_dim: int, rope_parameters: dict, max_position_embeddings: int, max_model_len: int
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * float(rope_parameters.get("partial_rotary_factor", 1.0)))
        inv_freq, scaling = _inv_freq_and_scaling(
            rope_parameters, self.rotary_dim, max_position_embeddings, max_model_len
        )
        positions = torch.arange(max(max_model_len, max_position_embeddings), dtype=torch.int64)
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * scaling, persistent=False)
        # The fused q/k kernel rotates whole heads of a power-of-two size.
        self.fusable = self.rotary_dim == head_dim and head_dim & (head_dim - 1) == 0

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)  # [N, 1, rotary_dim], broadcast over heads
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return x * cos + _rotate_half(x) * sin
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
