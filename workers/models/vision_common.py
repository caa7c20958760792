"""Small pieces shared by vision towers: their activation functions, attention restricted to
segments of a packed sequence, and rotary embedding applied in float32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import accumulate

import torch
import torch.nn.functional as F

from workers.layers.fused_ops import triton_module
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


class SegmentPlan:
    """How to attend within segments of a packed [N, ...] sequence: the segments' boundaries
    (for variable-length flash attention), and, built on first use, how to gather them into a
    padded [B, L] batch for one SDPA call and take the valid rows back out.

    Built once per encoder call and shared by every layer that uses the same segmentation."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"segment lengths must be positive, got {lengths}")
        self.lengths = lengths
        self.device = device
        self.max_length = max(lengths)
        self.cu_lengths = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)

    @cached_property
    def padded(self) -> PaddedSegments:
        return PaddedSegments.build(self.lengths, self.device)


@dataclass(frozen=True)
class PaddedSegments:
    gather: torch.Tensor              # [B, L]: packed row of each batch slot (0 in padding)
    key_mask: torch.Tensor | None     # [B, 1, 1, L] bool: real keys; None when nothing is padded
    keep: torch.Tensor                # [N]: index into the flattened [B * L] of each packed row

    @classmethod
    def build(cls, lengths: list[int], device: torch.device) -> PaddedSegments:
        sizes = torch.tensor(lengths, dtype=torch.int64, device=device)
        starts = torch.cumsum(sizes, 0) - sizes
        offsets = torch.arange(max(lengths), dtype=torch.int64, device=device)
        valid = offsets[None, :] < sizes[:, None]                         # [B, L]
        gather = torch.where(valid, starts[:, None] + offsets[None, :], 0)
        key_mask = None if min(lengths) == max(lengths) else valid[:, None, None, :]
        return cls(gather, key_mask, valid.flatten().nonzero().squeeze(1))


def _load_varlen_attention() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_varlen_attention = _load_varlen_attention()


def varlen_attention_applies(q: torch.Tensor) -> bool:
    """Variable-length flash attention (torch's, over FlashAttention) runs on CUDA in half
    precision with head sizes it supports; elsewhere the padded SDPA path does the same work."""
    return (_varlen_attention is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan,
                      scale: float) -> torch.Tensor:
    """Bidirectional attention of [N, heads, head_dim] q/k/v, each row seeing only its own
    segment."""
    if varlen_attention_applies(q):
        return _varlen_attention(q, k, v, plan.cu_lengths, plan.cu_lengths, plan.max_length, plan.max_length,
                                 scale=scale)
    return padded_segment_attention(q, k, v, plan.padded, scale)


def padded_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PaddedSegments,
                             scale: float) -> torch.Tensor:
    """The segments gathered into a padded batch for one SDPA call; padded query rows attend
    to their segment's keys and are dropped."""
    num_heads, head_dim = q.shape[1:]
    qp, kp, vp = (t[plan.gather].transpose(1, 2) for t in (q, k, v))   # [B, H, L, D]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.key_mask, scale=scale)
    return out.transpose(1, 2).reshape(-1, num_heads, head_dim)[plan.keep]


def rotate_qkv(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A vision block's qkv projection [N, 3 * heads * head_dim] -> q and k rotated by
    [N, head_dim] float32 angles (equal halves), and v; each [N, heads, head_dim]. One Triton
    kernel on CUDA."""
    n = qkv.shape[0]
    packed = qkv.view(n, 3, num_heads, -1)
    kernels = triton_module("vision") if qkv.is_cuda else None
    if kernels is not None and qkv.stride(-1) == 1:
        return kernels.rotary_qkv(packed, cos, sin)
    q, k, v = packed.unbind(1)
    return apply_rotary_float32(q, cos, sin), apply_rotary_float32(k, cos, sin), v


def apply_rotary_float32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [N, heads, head_dim] by [N, head_dim] angles, in float32 as the reference does."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + _rotate_half(x) * sin).to(dtype)
