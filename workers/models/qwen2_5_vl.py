"""Qwen2.5-VL: a ViT with windowed attention whose merged patches take the place of the image
placeholder tokens of a Qwen2 decoder with M-RoPE.

Checkpoint names: the hub layout (``model.layers.N...``, ``model.embed_tokens.weight``,
``visual.blocks.N...``, ``lm_head.weight``), which is also what transformers' save_pretrained
writes, and transformers' in-memory layout (``model.language_model.*``, ``model.visual.*``) are
both accepted; parameters here are named in the hub layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.encoder_graphs import EncoderGraphs
from workers.image_pixels import as_pixels
from workers.layers.mrope import MRotaryEmbedding
from workers.layers.fused_ops import fused_kernels
from workers.layers.norm import RMSNorm
from workers.models.llama import DecoderArgs
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.vision_common import (
    ACTIVATIONS,
    SegmentPlan,
    activation,
    rotate_qkv,
    segment_attention,
)
from workers.multimodal import MultiModalInput

VISION_PREFIX = "visual."
# transformers' in-memory prefixes -> ours (the hub's).
CHECKPOINT_PREFIXES = {"model.language_model.": "model.", "model.visual.": VISION_PREFIX}
DEFAULT_TEXT_ROPE_THETA = 1_000_000.0
DEFAULT_MROPE_SECTION = [16, 24, 24]
VISION_NORM_EPS = 1e-6


def text_config_of(hf_config: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The decoder's settings as a flat config that DecoderArgs reads, and the M-RoPE sections.

    Older configs keep the text settings at top level, transformers 5 under "text_config"."""
    nested = hf_config.get("text_config") or {}
    config = {k: v for k, v in hf_config.items() if k not in ("text_config", "vision_config")}
    config.update(nested)
    if config.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window) is not implemented for Qwen2.5-VL")
    rope = dict(config.pop("rope_scaling", None) or config.get("rope_parameters") or {})
    rope_type = rope.pop("type", None)
    rope_type = rope.get("rope_type") or rope_type or "default"
    # Qwen2-VL-era configs call plain RoPE over M-RoPE positions "mrope".
    rope["rope_type"] = "default" if rope_type == "mrope" else rope_type
    mrope_section = list(rope.pop("mrope_section", None) or DEFAULT_MROPE_SECTION)
    rope.setdefault("rope_theta", config.get("rope_theta") or DEFAULT_TEXT_ROPE_THETA)
    config["rope_parameters"] = rope
    # The reference derives head_dim from hidden_size, whatever the config says.
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    # transformers ties when either the top level or (pre-v5 saves) the text config says so.
    config["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings") or
                                         nested.get("tie_word_embeddings"))
    return config, mrope_section


@dataclass(frozen=True)
class VisionArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> VisionArgs:
        """Missing keys take transformers' Qwen2_5_VLVisionConfig defaults."""
        act = cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        rope = cfg.get("rope_parameters") or {}
        args = cls(
            depth=cfg.get("depth", 32),
            hidden_size=cfg.get("hidden_size", 3584),
            intermediate_size=cfg.get("intermediate_size", 3420),
            num_heads=cfg.get("num_heads", 16),
            in_channels=cfg.get("in_channels") or cfg.get("in_chans") or 3,
            patch_size=cfg.get("patch_size", 14),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            spatial_merge_size=cfg.get("spatial_merge_size", 2),
            window_size=cfg.get("window_size", 112),
            out_hidden_size=cfg.get("out_hidden_size", 3584),
            fullatt_block_indexes=tuple(cfg.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=act,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
        if args.hidden_size % args.num_heads or (args.hidden_size // args.num_heads) % 4:
            raise ValueError(f"vision hidden_size={args.hidden_size} must split into num_heads={args.num_heads} "
                             f"heads of a size divisible by 4")
        if args.window_size // args.spatial_merge_size // args.patch_size < 1:
            raise ValueError(f"vision window_size={args.window_size} is smaller than one merged patch")
        return args

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token."""
        return self.spatial_merge_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values of one flattened patch (the image processor's row)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_units(self) -> int:
        """Side of an attention window, in merged patches."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class ImageLayout:
    """One image's share of a VisionLayout (patch indices local to the image), on the device."""

    window_order: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    frame_lengths: tuple[int, ...]
    window_lengths: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return self.window_order.shape[0]


@lru_cache(maxsize=16)
def image_layout(args: VisionArgs, grid: tuple[int, int, int], device: torch.device) -> ImageLayout:
    """Built once per image size (and kept for the next image of that size): a dozen small CPU
    ops and a copy to the device otherwise sit in front of every encoder call."""
    merge, span = args.spatial_merge_size, args.window_units
    t, h, w = grid
    rows, cols = h // merge, w // merge
    windows_down, windows_across = -(-rows // span), -(-cols // span)
    frame = torch.arange(t)[:, None, None]
    row = torch.arange(rows)[None, :, None]
    col = torch.arange(cols)[None, None, :]
    window = (frame * windows_down + row // span) * windows_across + col // span
    # Sorting by window, then row-major inside it, gives the reference's window order.
    key = (window * span + row % span) * span + col % span
    units = torch.argsort(key.flatten())
    counts = torch.bincount(window.flatten(), minlength=t * windows_down * windows_across)
    window_order = (units[:, None] * args.merge_unit + torch.arange(args.merge_unit)).flatten()
    # Patch coordinates in the processor's layout: merge blocks row-major, then inside.
    block_shape = (rows, merge, cols, merge)
    patch_rows = torch.arange(h).view(rows, merge, 1, 1).expand(block_shape).permute(0, 2, 1, 3).flatten()
    patch_cols = torch.arange(w).view(1, 1, cols, merge).expand(block_shape).permute(0, 2, 1, 3).flatten()
    # Axial 2-D rotary: a quarter of head_dim frequencies for the row, as many for the column.
    quarter = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
    coords = torch.stack([patch_rows.repeat(t), patch_cols.repeat(t)], dim=1)[window_order].to(device)
    inv_freq = inv_freq.to(device)
    angles = torch.cat([coords[:, :1] * inv_freq, coords[:, 1:] * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return ImageLayout(window_order.to(device), angles.cos(), angles.sin(), (h * w,) * t,
                       tuple((counts[counts > 0] * args.merge_unit).tolist()))


@dataclass(frozen=True)
class VisionLayout:
    """Where the patches of one batch of images go inside the tower.

    The blocks see patches in window order (each window's patches contiguous, merge units kept
    together); ``window_order[i]`` is the input patch at position i, ``input_order`` undoes it.
    """

    window_order: torch.Tensor
    input_order: torch.Tensor
    cos: torch.Tensor   # [N, head_dim] float32, window order
    sin: torch.Tensor
    full: SegmentPlan   # one segment per image frame
    windows: SegmentPlan

    @classmethod
    def build(cls, args: VisionArgs, grids: list[tuple[int, int, int]], device: torch.device) -> VisionLayout:
        parts = [image_layout(args, tuple(grid), device) for grid in grids]
        if len(parts) == 1:
            window_order, cos, sin = parts[0].window_order, parts[0].cos, parts[0].sin
        else:
            starts = accumulate((part.num_patches for part in parts[:-1]), initial=0)
            window_order = torch.cat([part.window_order + start for part, start in zip(parts, starts)])
            cos, sin = torch.cat([part.cos for part in parts]), torch.cat([part.sin for part in parts])
        return cls(window_order, torch.argsort(window_order), cos, sin,
                   SegmentPlan([n for part in parts for n in part.frame_lengths], device),
                   SegmentPlan([n for part in parts for n in part.window_lengths], device))


class VisionPatchEmbed(nn.Module):
    """The reference's Conv3d with stride = kernel: one matmul over each flattened patch. The
    weight keeps the checkpoint's [out, C, T, P, P] shape."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        kernel = (args.temporal_patch_size, args.patch_size, args.patch_size)
        self.proj = nn.Conv3d(args.in_channels, args.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.num_heads, self.head_dim = args.num_heads, args.head_dim
        self.qkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, layout: VisionLayout, plan: SegmentPlan) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = rotate_qkv(self.qkv(x), self.num_heads, layout.cos, layout.sin)
        out = segment_attention(q, k, v, plan, self.scale)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    """Gated MLP with biases; kept as separate projections, as checkpointed (never TP-sliced),
    until ``pack_weights_for_device`` joins gate and up into one matrix."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=True)
        self.act_name = args.hidden_act
        self.act = activation(args.hidden_act)
        self.gate_up_proj: nn.Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        kernels = fused_kernels(gate_up)
        if kernels is not None and self.act_name == "silu":
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def pack_weights_for_device(self, multiple: int = 64) -> None:
        """gate and up in one [2 * I', hidden] matrix, I' the intermediate size rounded up to
        ``multiple`` with zero rows (and down_proj given as many zero columns): one GEMM instead
        of two, and rows of a 16-byte multiple, which Hopper's GEMM kernels need (Qwen2.5-VL's
        3420 is not; its GEMMs fall back to older, slower kernels). The padded units compute
        silu(0) * 0 = 0 and add nothing."""
        if self.gate_up_proj is not None:
            return
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        inter, hidden = gate.weight.shape
        padded = -(-inter // multiple) * multiple
        like = {"device": gate.weight.device, "dtype": gate.weight.dtype}
        gate_up = nn.Linear(hidden, 2 * padded, bias=True, **like)
        packed_down = nn.Linear(padded, hidden, bias=True, **like)
        with torch.no_grad():
            gate_up.weight.zero_()
            gate_up.bias.zero_()
            gate_up.weight[:inter].copy_(gate.weight)
            gate_up.weight[padded:padded + inter].copy_(up.weight)
            gate_up.bias[:inter].copy_(gate.bias)
            gate_up.bias[padded:padded + inter].copy_(up.bias)
            packed_down.weight.zero_()
            packed_down.weight[:, :inter].copy_(down.weight)
            packed_down.bias.copy_(down.bias)
        del self.gate_proj, self.up_proj
        self.gate_up_proj, self.down_proj = gate_up, packed_down


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs, full_attention: bool) -> None:
        super().__init__()
        self.full_attention = full_attention
        self.norm1 = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.attn = VisionAttention(args)
        self.norm2 = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.mlp = VisionMLP(args)

    def forward(self, x: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        plan = layout.full if self.full_attention else layout.windows
        normed, x = self.norm2.add_and_norm(self.attn(self.norm1(x), layout, plan), x)
        return x + self.mlp(normed)


class PatchMerger(nn.Module):
    """The projector: each merge unit's patch features, concatenated, through a GELU MLP."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.merged_size = args.hidden_size * args.merge_unit
        self.ln_q = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.merged_size, self.merged_size), nn.GELU(),
                                 nn.Linear(self.merged_size, args.out_hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(features).view(-1, self.merged_size))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_embed = VisionPatchEmbed(args)
        self.blocks = nn.ModuleList(VisionBlock(args, i in args.fullatt_block_indexes)
                                    for i in range(args.depth))
        self.merger = PatchMerger(args)

    def prepare(self, grids: list[tuple[int, int, int]], device: torch.device) -> VisionLayout:
        """What ``run`` reads besides the patches: made on the host and copied over, so kept out
        of a CUDA graph of ``run``."""
        return VisionLayout.build(self.args, grids, device)

    def features(self, patches: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        """[N, hidden_size] output of the last block, in the input patch order."""
        x = self.patch_embed(patches)[layout.window_order]
        for block in self.blocks:
            x = block(x, layout)
        return x[layout.input_order]

    def run(self, patches: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        """``forward`` on a prepared layout: device work only."""
        return self.merger(self.features(patches, layout))

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[N / merge_unit, out_hidden_size]: one row per LM token, images in order."""
        return self.run(patches, self.prepare(grids, patches.device))


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    """Qwen2.5-VL for the model runner (see workers/multimodal.py for the contract).

    ``encode`` sources, all of modality "image":

    - "pixels": one image's pixel_values as transformers' Qwen2VLImageProcessor lays them out,
      [t * h * w, channels * temporal_patch_size * patch_size**2], with ``grid_thw`` = (t, h, w);
      all pixel items of a call go through the vision tower together;
    - "embeds": the tower's output (after the merger), [num_tokens, text hidden_size];
    - "features": the output of the last vision block, before the merger, in the processor's
      patch order (not the window order used inside the tower): [num_tokens * spatial_merge_size**2,
      vision hidden_size]; it goes through the merger (the projector).

    ``mrope_positions`` needs every item's ``grid_thw``, whatever its source.

    The decoder is tensor-parallel like LlamaForCausalLM; the vision tower is replicated whole on
    every rank.
    """

    uses_mrope = True

    def __init__(self, hf_config: dict[str, Any], max_model_len: int) -> None:
        text_config, mrope_section = text_config_of(hf_config)
        super().__init__(text_config, max_model_len)
        args = self.args
        # The decoder comes with plain RoPE; all its layers share one M-RoPE instead.
        mrope = MRotaryEmbedding(args.head_dim, args.rope_parameters, args.max_position_embeddings,
                                 max_model_len, mrope_section, interleaved=False)
        for layer in self.model.layers:
            layer.self_attn.rotary = mrope
        self.vision_args = VisionArgs.from_hf_config(hf_config.get("vision_config") or {})
        if self.vision_args.out_hidden_size != args.hidden_size:
            raise ValueError(f"vision out_hidden_size={self.vision_args.out_hidden_size} differs from the "
                             f"text hidden_size={args.hidden_size}")
        self.visual = VisionTransformer(self.vision_args)
        # CUDA graphs of the tower, per batch of image grids (set by use_encoder_graphs).
        self.vision_graphs: EncoderGraphs | None = None
        self.image_token_id = int(hf_config.get("image_token_id", 151655))
        self.embed_width = args.hidden_size

    @staticmethod
    def make_args(hf_config: dict[str, Any]) -> DecoderArgs:
        return DecoderArgs.from_hf_config(hf_config, qkv_bias=True, o_bias=False)

    def use_encoder_graphs(self, max_tokens: int) -> None:
        """Run the vision tower from CUDA graphs, one per batch of image grids that recurs, for
        batches of up to ``max_tokens`` placeholder tokens."""
        device = self.model.embed_tokens.weight.device
        self.vision_graphs = EncoderGraphs(self.visual.run, lambda grids: self.visual.prepare(list(grids), device),
                                           max_tokens * self.vision_args.merge_unit)

    def encode(self, items: list[MultiModalInput]) -> list[torch.Tensor]:
        weight = self.model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        items = [as_pixels(item, device) for item in items]
        outputs: list[torch.Tensor | None] = [None] * len(items)
        pixel_indexes: list[int] = []
        for index, item in enumerate(items):
            if item.modality != "image":
                raise ValueError(f"Qwen2.5-VL encodes images only, got modality {item.modality!r}")
            if item.source == "pixels":
                self._check_pixels(item)
                pixel_indexes.append(index)
            elif item.source == "embeds":
                self._check_shape(item, (item.num_tokens, self.embed_width))
                outputs[index] = item.data.to(device, dtype)
            elif item.source == "features":
                args = self.vision_args
                self._check_shape(item, (item.num_tokens * args.merge_unit, args.hidden_size))
                outputs[index] = self.visual.merger(item.data.to(device, dtype))
            else:
                raise ValueError(f"unknown multimodal source {item.source!r}")
        if pixel_indexes:
            grids = [tuple(items[i].grid_thw) for i in pixel_indexes]
            patches = torch.cat([items[i].data for i in pixel_indexes]).to(device, dtype)
            if self.vision_graphs is not None:
                merged = self.vision_graphs(patches, tuple(grids))
            else:
                merged = self.visual(patches, grids)
            parts = merged.split([items[i].num_tokens for i in pixel_indexes])
            for index, part in zip(pixel_indexes, parts):
                # Own storage per item: the encoder cache keeps items, not the whole batch.
                outputs[index] = part.clone() if len(parts) > 1 else part
        return outputs

    def mrope_positions(self, prompt_token_ids: list[int],
                        items: list[MultiModalInput]) -> tuple[torch.Tensor, int]:
        """Text tokens count up on all three axes; an image's tokens take (t, h, w) indices of
        its merged grid plus the position where it starts, and the text after it goes on from
        the image's largest index + 1 (as transformers' get_rope_index does)."""
        merge = self.vision_args.spatial_merge_size
        parts: list[torch.Tensor] = []
        next_position = cursor = 0
        for item in sorted(items, key=lambda item: item.offset):
            if item.grid_thw is None:
                raise ValueError(f"image item {item.hash!r} has no grid_thw")
            if item.offset < cursor or item.end > len(prompt_token_ids):
                raise ValueError(f"image placeholder run [{item.offset}, {item.end}) lies outside the prompt "
                                 f"or overlaps another")
            text = torch.arange(item.offset - cursor, dtype=torch.int64)
            parts.append(text.expand(3, -1) + next_position)
            next_position += item.offset - cursor
            t, h, w = item.grid_thw
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge),
                                              indexing="ij")).reshape(3, -1)
            if grid.shape[1] != item.num_tokens:
                raise ValueError(f"image grid {tuple(item.grid_thw)} gives {grid.shape[1]} tokens, the item has "
                                 f"{item.num_tokens}")
            parts.append(grid + next_position)
            next_position += int(grid.max()) + 1
            cursor = item.end
        tail = torch.arange(len(prompt_token_ids) - cursor, dtype=torch.int64)
        parts.append(tail.expand(3, -1) + next_position)
        positions = torch.cat(parts, dim=1)
        last = int(positions.max()) if positions.numel() else -1
        return positions, last + 1 - len(prompt_token_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in (hub or transformers layout); ValueError on an unknown,
        mis-shaped or missing tensor."""
        super().load_weights((self._hub_name(name), tensor) for name, tensor in weights)

    @staticmethod
    def _hub_name(name: str) -> str:
        for prefix, ours in CHECKPOINT_PREFIXES.items():
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        return name

    def _locate(self, name: str, params: dict[str, nn.Parameter]) -> torch.Tensor:
        if name.startswith(VISION_PREFIX):
            return params[name].data   # vision projections are not fused
        return super()._locate(name, params)

    def _rank_part(self, name: str, tensor: Any) -> torch.Tensor:
        if name.startswith(VISION_PREFIX):
            part = tensor[:]           # the vision tower is replicated, never sliced
            return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)
        return super()._rank_part(name, tensor)

    def _check_pixels(self, item: MultiModalInput) -> None:
        if item.grid_thw is None or len(item.grid_thw) != 3:
            raise ValueError(f"pixel item {item.hash!r} needs grid_thw (t, h, w)")
        t, h, w = item.grid_thw
        merge = self.vision_args.spatial_merge_size
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw {tuple(item.grid_thw)}: h and w must be positive multiples of "
                             f"spatial_merge_size={merge}")
        self._check_shape(item, (t * h * w, self.vision_args.patch_dim))
        if item.num_tokens != t * h * w // self.vision_args.merge_unit:
            raise ValueError(f"grid_thw {tuple(item.grid_thw)} gives {t * h * w // self.vision_args.merge_unit} "
                             f"tokens, the item has {item.num_tokens}")

    @staticmethod
    def _check_shape(item: MultiModalInput, shape: tuple[int, int]) -> None:
        if tuple(item.data.shape) != shape:
            raise ValueError(f"{item.source} item {item.hash!r} has shape {tuple(item.data.shape)}, "
                             f"expected {shape}")
