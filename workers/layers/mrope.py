"""Multimodal rotary embedding (M-RoPE) of the Qwen-VL families.

Positions are [3, N]: temporal, height and width indices. Each rotary frequency takes its angle
from one of the three axes: in contiguous sections (Qwen2-VL, Qwen2.5-VL, ``mrope_section``
[t, h, w] frequencies each) or interleaved t, h, w, t, h, w, ... (Qwen3-VL). Text tokens carry
equal indices on all axes, which makes M-RoPE plain RoPE for them.
"""

from __future__ import annotations

import torch

from workers.layers.rotary import _inv_freq_and_scaling, _rotate_half


def axis_of_frequency(mrope_section: list[int], interleaved: bool) -> torch.Tensor:
    """For each of the head_dim // 2 frequencies, the position axis (0, 1, 2) it reads."""
    half = sum(mrope_section)
    if not interleaved:
        return torch.cat([torch.full((size,), i % 3, dtype=torch.int64)
                          for i, size in enumerate(mrope_section)])
    axis = torch.zeros(half, dtype=torch.int64)
    for dim in (1, 2):
        axis[dim:mrope_section[dim] * 3:3] = dim
    return axis


class MRotaryEmbedding(torch.nn.Module):
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    axis: torch.Tensor

    def __init__(self, head_dim: int, rope_parameters: dict, max_position_embeddings: int,
                 max_model_len: int, mrope_section: list[int], interleaved: bool) -> None:
        super().__init__()
        if sum(mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = "
                             f"{head_dim // 2}")
        self.head_dim = head_dim
        inv_freq, scaling = _inv_freq_and_scaling(rope_parameters, head_dim,
                                                  max_position_embeddings, max_model_len)
        positions = torch.arange(max(max_model_len, max_position_embeddings), dtype=torch.int64)
        freqs = positions[:, None].float() * inv_freq   # [P, head_dim // 2]
        self.register_buffer("cos_cache", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * scaling, persistent=False)
        self.register_buffer("axis", axis_of_frequency(mrope_section, interleaved),
                             persistent=False)
        # The decoder's fused q/k rotary kernel takes M-RoPE's [3, N] positions with ``axis``.
        self.fusable = head_dim & (head_dim - 1) == 0

    def _select(self, cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 1:
            half = cache[positions]
        else:
            per_axis = cache[positions]                      # [3, N, half]
            index = self.axis.view(1, 1, -1).expand(1, positions.shape[1], -1)
            half = per_axis.gather(0, index)[0]              # [N, half]
        return torch.cat((half, half), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self._select(self.cos_cache, positions).to(q.dtype).unsqueeze(1)
        sin = self._select(self.sin_cache, positions).to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
