"""Small pieces shared by vision towers: their activation functions, attention restricted to
segments of a packed sequence, and rotary embedding applied in float32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from workers.layers.rotary import _rotate_half


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# config.json "hidden_act" names -> function, as transformers' ACT2FN defines them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class SegmentPlan:
    """How to attend within segments of a packed [N, ...] sequence in one SDPA call: the
    segments are gathered into a padded [B, L] batch, and the valid rows taken back out.

    Built once per encoder call and shared by every layer that uses the same segmentation."""

    gather: torch.Tensor              # [B, L]: packed row of each batch slot (0 in padding)
    key_mask: torch.Tensor | None     # [B, 1, 1, L] bool: real keys; None when nothing is padded
    keep: torch.Tensor                # [N]: index into the flattened [B * L] of each packed row

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> SegmentPlan:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"segment lengths must be positive, got {lengths}")
        sizes = torch.tensor(lengths, dtype=torch.int64, device=device)
        starts = torch.cumsum(sizes, 0) - sizes
        offsets = torch.arange(max(lengths), dtype=torch.int64, device=device)
        valid = offsets[None, :] < sizes[:, None]                         # [B, L]
        gather = torch.where(valid, starts[:, None] + offsets[None, :], 0)
        key_mask = None if min(lengths) == max(lengths) else valid[:, None, None, :]
        return cls(gather, key_mask, valid.flatten().nonzero().squeeze(1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan,
                      scale: float) -> torch.Tensor:
    """Bidirectional attention of [N, heads, head_dim] q/k/v, each row seeing only its own
    segment. Padded query rows attend to their segment's keys and are dropped."""
    num_heads, head_dim = q.shape[1:]
    qp, kp, vp = (t[plan.gather].transpose(1, 2) for t in (q, k, v))   # [B, H, L, D]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.key_mask, scale=scale)
    return out.transpose(1, 2).reshape(-1, num_heads, head_dim)[plan.keep]


def apply_rotary_float32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [N, heads, head_dim] by [N, head_dim] angles, in float32 as the reference does."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + _rotate_half(x) * sin).to(dtype)
