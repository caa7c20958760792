"""CLIP and SigLIP vision transformers in plain PyTorch, the vision towers of LLaVA-style VLMs.

Parameter names are transformers' CLIPVisionModel / SiglipVisionModel ones without the
``vision_model.`` prefix: ``embeddings.*``, ``pre_layrnorm.*`` (CLIP's spelling),
``encoder.layers.N.*``, ``post_layernorm.*``.

Hidden states are numbered as transformers' ``output_hidden_states``: 0 is the input of the first
layer (after CLIP's pre-layernorm), i the output of layer i - 1. The post-layernorm and SigLIP's
pooling head touch none of them, so a tower that serves hidden states only is built without them
and without the layers past the deepest state it serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.vision_common import activation

# config.json model_type -> family, and each family's config defaults (transformers' config classes).
FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
                   hidden_act="gelu_pytorch_tanh"),
}


@dataclass(frozen=True)
class VisionArgs:
    family: str            # "clip" or "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> VisionArgs:
        """From a vision_config dict; absent keys take the family's transformers defaults."""
        model_type = cfg.get("model_type", "clip_vision_model")
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported vision tower {model_type!r}; supported: {', '.join(FAMILIES)}")
        family = FAMILIES[model_type]
        merged = {**FAMILY_DEFAULTS[family], **{k: v for k, v in cfg.items() if v is not None}}
        activation(merged["hidden_act"])
        args = cls(family=family, hidden_size=merged["hidden_size"],
                   intermediate_size=merged["intermediate_size"], num_layers=merged["num_hidden_layers"],
                   num_heads=merged["num_attention_heads"], num_channels=merged["num_channels"],
                   image_size=merged["image_size"], patch_size=merged["patch_size"],
                   layer_norm_eps=merged["layer_norm_eps"], hidden_act=merged["hidden_act"])
        if args.hidden_size % args.num_heads:
            raise ValueError(f"vision hidden_size={args.hidden_size} is not a multiple of "
                             f"num_attention_heads={args.num_heads}")
        return args

    @property
    def has_class_token(self) -> bool:
        return self.family == "clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Rows of one image's hidden states: its patches, after CLIP's class token."""
        return self.num_patches + int(self.has_class_token)

    def hidden_state_index(self, index: int) -> int:
        """A hidden-state index, possibly negative (from the end of the whole tower), as 0..num_layers."""
        count = self.num_layers + 1
        if not -count <= index < count:
            raise ValueError(f"hidden state {index} is out of range for a vision tower of {self.num_layers} layers")
        return index % count


class VisionEmbeddings(nn.Module):
    """Conv patch embedding (with a bias in SigLIP), CLIP's class token first, learned positions."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.image_size = args.image_size
        if args.has_class_token:
            self.class_embedding = nn.Parameter(torch.empty(args.hidden_size))
        self.has_class_token = args.has_class_token
        self.patch_embedding = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                         stride=args.patch_size, bias=args.family == "siglip")
        self.position_embedding = nn.Embedding(args.num_positions, args.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} pixels, got "
                             f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]}")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if self.has_class_token:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.hidden_size // args.num_heads
        self.q_proj = nn.Linear(args.hidden_size, args.hidden_size)
        self.k_proj = nn.Linear(args.hidden_size, args.hidden_size)
        self.v_proj = nn.Linear(args.hidden_size, args.hidden_size)
        self.out_proj = nn.Linear(args.hidden_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act_fn = activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = VisionAttention(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = VisionMLP(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(args) for _ in range(num_layers))


class VisionTransformer(nn.Module):
    """A CLIP or SigLIP vision tower of the first ``num_layers`` layers (all by default), with the
    post-layernorm only where ``post_layernorm`` asks for it."""

    def __init__(self, args: VisionArgs, num_layers: int | None = None, post_layernorm: bool = False) -> None:
        super().__init__()
        num_layers = args.num_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= args.num_layers:
            raise ValueError(f"cannot build {num_layers} of a vision tower's {args.num_layers} layers")
        if post_layernorm and num_layers != args.num_layers:
            raise ValueError("the post-layernorm follows the last layer: build all layers to use it")
        self.args = args
        self.embeddings = VisionEmbeddings(args)
        if args.family == "clip":
            self.pre_layrnorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.encoder = VisionEncoder(args, num_layers)
        if post_layernorm:
            self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states ``indices`` (transformers' numbering) of a [B, C, H, W] batch, each
        [B, num_positions, hidden_size]."""
        wanted = [self.args.hidden_state_index(i) for i in indices]
        depth = max(wanted)
        if depth > len(self.encoder.layers):
            raise ValueError(f"hidden state {depth} needs {depth} layers, this tower has {len(self.encoder.layers)}")
        x = self.embeddings(pixel_values)
        if self.args.family == "clip":
            x = self.pre_layrnorm(x)
        states = {0: x}
        for number, layer in enumerate(self.encoder.layers[:depth], start=1):
            x = layer(x)
            if number in wanted:
                states[number] = x
        return [states[i] for i in wanted]

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last layer's output through the post-layernorm (SigLIP's last_hidden_state)."""
        if not hasattr(self, "post_layernorm"):
            raise ValueError("this vision tower was built without its post-layernorm")
        [x] = self.forward(pixel_values, [-1])
        return self.post_layernorm(x)

    def is_unused_tensor(self, name: str) -> bool:
        """Whether a checkpoint tensor (named without the ``vision_model.`` prefix) belongs to a
        part of the tower left out here: later layers, the post-layernorm, SigLIP's pooling head,
        or the position-id buffer older checkpoints saved."""
        if name == "embeddings.position_ids":
            return True
        if name.startswith("post_layernorm."):
            return not hasattr(self, "post_layernorm")
        if name.startswith("head.") and self.args.family == "siglip":
            return True
        parts = name.split(".")
        if name.startswith("encoder.layers.") and parts[2].isdigit():
            return len(self.encoder.layers) <= int(parts[2]) < self.args.num_layers
        return False
