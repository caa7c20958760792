"""Qwen3-VL (dense) in plain PyTorch: a ViT with learned, resampled position embeddings and 2-D
rotary, a patch merger, DeepStack mergers on intermediate ViT layers, and a Qwen3 decoder with
interleaved M-RoPE.

Checkpoint names follow transformers (model.visual.*, model.language_model.*, lm_head.weight),
which is also the layout of the published checkpoints. An encoder-output row is
[merger output | DeepStack level 0 | level 1 | ...], each text hidden_size wide: the first part
replaces the placeholder token's embedding, level i is added to its hidden state after decoder
layer i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.encoder_graphs import EncoderGraphs
from workers.image_pixels import as_pixels
from workers.distributed import all_gather_last_dim, tp_rank, tp_size
from workers.layers.attention_base import AttentionMetadata
from workers.layers.linear import linear
from workers.layers.mrope import MRotaryEmbedding
from workers.layers.norm import RMSNorm
from workers.models.llama import (
    Attention,
    DecoderArgs,
    DecoderLayer,
    LlamaForCausalLM,
    ShardPlan,
    VocabParallelEmbedding,
)
from workers.models.vision_common import ACTIVATIONS, SegmentPlan, rotate_qkv, segment_attention
from workers.multimodal import MultiModalEmbeds, MultiModalInput

VISION_PREFIX = "model.visual."
EMBED_TOKENS = "model.language_model.embed_tokens.weight"
DEFAULT_MROPE_SECTION = [24, 20, 20]


def text_settings(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config: ``text_config`` (or the top level of a flat config), with the rope
    settings in a form rope_parameters_from_config accepts and the tying flag resolved."""
    text = dict(hf_config.get("text_config") or hf_config)
    # The top-level flag is the one transformers reads for the composite model.
    tie = hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = bool(tie)
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    rope_type = rope.pop("type", None)
    rope_type = rope.get("rope_type") or rope_type or "default"
    rope["rope_type"] = "default" if rope_type == "mrope" else rope_type   # old Qwen2-VL spelling
    text.pop("rope_scaling", None)
    text["rope_parameters"] = rope
    return text


def mrope_section_of(text: dict[str, Any]) -> list[int]:
    return list(text["rope_parameters"].get("mrope_section") or DEFAULT_MROPE_SECTION)


# ----------------------------------------------------------------------------- vision tower


class VisionSettings:
    """The vision_config fields the tower uses, with transformers' defaults."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.depth: int = cfg.get("depth", 27)
        self.hidden_size: int = cfg.get("hidden_size", 1152)
        self.intermediate_size: int = cfg.get("intermediate_size", 4304)
        self.num_heads: int = cfg.get("num_heads", 16)
        self.in_channels: int = cfg.get("in_channels", 3)
        self.patch_size: int = cfg.get("patch_size", 16)
        self.temporal_patch_size: int = cfg.get("temporal_patch_size", 2)
        self.spatial_merge_size: int = cfg.get("spatial_merge_size", 2)
        self.out_hidden_size: int = cfg.get("out_hidden_size", 3584)
        self.num_position_embeddings: int = cfg.get("num_position_embeddings", 2304)
        self.deepstack_visual_indexes: list[int] = list(cfg.get("deepstack_visual_indexes", (8, 16, 24)))
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[act]
        rope = cfg.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        self.pos_side = round(self.num_position_embeddings ** 0.5)
        if self.pos_side ** 2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings={self.num_position_embeddings} is not a perfect square")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be a multiple of 4 for 2-D rotary")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} out of range for "
                             f"depth {self.depth}")

    @property
    def patch_width(self) -> int:
        """Values per patch row of pixel_values: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d, whose stride equals its kernel: one matmul over flattened patches."""

    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(s.hidden_size, s.in_channels, s.temporal_patch_size,
                                                    s.patch_size, s.patch_size))
        self.proj.bias = nn.Parameter(torch.empty(s.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.num_heads, self.head_dim = s.num_heads, s.head_dim
        self.qkv = nn.Linear(s.hidden_size, 3 * s.hidden_size)
        self.proj = nn.Linear(s.hidden_size, s.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: SegmentPlan) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = rotate_qkv(self.qkv(x), self.num_heads, cos, sin)
        out = segment_attention(q, k, v, frames, self.head_dim ** -0.5)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(s.hidden_size, s.intermediate_size)
        self.linear_fc2 = nn.Linear(s.intermediate_size, s.hidden_size)
        self.activation = s.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.activation(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(s.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(s.hidden_size, eps=1e-6)
        self.attn = VisionAttention(s)
        self.mlp = VisionMLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: SegmentPlan) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge block's patches and projects them to the text width. The main
    merger normalises patches before concatenating, the DeepStack mergers after."""

    def __init__(self, s: VisionSettings, norm_after_concat: bool) -> None:
        super().__init__()
        self.width = s.hidden_size * s.spatial_merge_size ** 2
        self.norm_after_concat = norm_after_concat
        self.norm = nn.LayerNorm(self.width if norm_after_concat else s.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.linear_fc2 = nn.Linear(self.width, s.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_concat:
            x = self.norm(x.reshape(-1, self.width))
        else:
            x = self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


@dataclass(frozen=True)
class TowerLayout:
    position_embeddings: torch.Tensor   # [N, hidden] float32
    cos: torch.Tensor                   # [N, head_dim] float32
    sin: torch.Tensor
    frames: SegmentPlan                 # one segment per frame


class VisionTower(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, s: VisionSettings) -> None:
        super().__init__()
        self.settings = s
        self.patch_embed = PatchEmbed(s)
        self.pos_embed = nn.Embedding(s.num_position_embeddings, s.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(s) for _ in range(s.depth))
        self.merger = PatchMerger(s, norm_after_concat=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(s, norm_after_concat=True)
                                                   for _ in s.deepstack_visual_indexes)
        # Rows and columns each rotate a quarter of the frequencies of a head.
        quarter = s.head_dim // 2
        exponents = torch.arange(0, quarter, 2, dtype=torch.float32) / quarter
        self.register_buffer("inv_freq", 1.0 / (s.rope_theta ** exponents), persistent=False)

    def prepare(self, grids: list[tuple[int, int, int]], device: torch.device) -> TowerLayout:
        """What ``run`` reads besides the pixels, for these grids: made outside a CUDA graph of
        ``run`` (the frame boundaries are copied from the host)."""
        cos, sin = self.rotary(grids, device)
        return TowerLayout(self.position_embeddings(grids), cos, sin,
                           SegmentPlan([h * w for t, h, w in grids for _ in range(t)], device))

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Patches of several images (concatenated, in the image processor's order) -> rows of
        [merger output | DeepStack levels...], images in order."""
        return self.run(pixels, self.prepare(grids, pixels.device))

    def run(self, pixels: torch.Tensor, layout: TowerLayout) -> torch.Tensor:
        """``forward`` on a prepared layout: device work only."""
        s = self.settings
        x = self.patch_embed(pixels)
        x = x + layout.position_embeddings.to(x.dtype)
        cos, sin, frames = layout.cos, layout.sin, layout.frames
        levels: list[torch.Tensor] = []
        for depth, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if depth in s.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[s.deepstack_visual_indexes.index(depth)]
                levels.append(merger(x))
        return torch.cat([self.merger(x), *levels], dim=-1)

    def position_embeddings(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The square learned table resampled bilinearly (corners aligned) to each grid, in
        merge-block order, repeated over frames. Float32."""
        s = self.settings
        side, m = s.pos_side, s.spatial_merge_size
        table = self.pos_embed.weight.float().view(side, side, -1)
        parts = []
        for t, h, w in grids:
            r0, r1, dr = _bilinear_taps(h, side, table.device)
            c0, c1, dc = _bilinear_taps(w, side, table.device)
            dr, dc = dr[:, None, None], dc[None, :, None]
            top = table[r0][:, c0] * (1 - dc) + table[r0][:, c1] * dc
            bottom = table[r1][:, c0] * (1 - dc) + table[r1][:, c1] * dc
            grid = top * (1 - dr) + bottom * dr                       # [h, w, D]
            grid = grid.view(h // m, m, w // m, m, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
            parts.append(grid.repeat(t, 1))
        return torch.cat(parts)

    def rotary(self, grids: list[tuple[int, int, int]],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, head_dim] of each patch's (row, column) in merge-block order."""
        m = self.settings.spatial_merge_size
        rows, cols = [], []
        for t, h, w in grids:
            r = torch.arange(h, device=device)[:, None].expand(h, w)
            c = torch.arange(w, device=device)[None, :].expand(h, w)
            for coords, out in ((r, rows), (c, cols)):
                out.append(coords.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten().repeat(t))
        inv_freq = self.inv_freq.to(device)
        freqs = torch.cat([torch.cat(rows)[:, None] * inv_freq, torch.cat(cols)[:, None] * inv_freq], dim=-1)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def _bilinear_taps(size: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For `size` target points spread over [0, side - 1]: lower and upper source index, and the
    upper one's weight."""
    points = torch.linspace(0, side - 1, size, device=device)
    lower = points.floor().long()
    upper = (lower + 1).clamp(max=side - 1)
    return lower, upper, points - lower


# ----------------------------------------------------------------------------- language model


class TextModel(nn.Module):
    def __init__(self, args: DecoderArgs, shard: ShardPlan, max_model_len: int,
                 mrope_section: list[int]) -> None:
        super().__init__()
        rotary = MRotaryEmbedding(args.head_dim, args.rope_parameters, args.max_position_embeddings,
                                  max_model_len, mrope_section, interleaved=True)
        self.embed_tokens = VocabParallelEmbedding(shard.vocab_shard, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, shard, rotary) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Qwen3VLModel(nn.Module):
    def __init__(self, visual: VisionTower, language_model: TextModel) -> None:
        super().__init__()
        self.visual = visual
        self.language_model = language_model


class Qwen3VLForConditionalGeneration(LlamaForCausalLM):
    """Reuses LlamaForCausalLM's checkpoint loading and tensor-parallel slicing; the vision tower
    is replicated on every rank."""

    uses_mrope = True

    def __init__(self, hf_config: dict[str, Any], max_model_len: int) -> None:
        nn.Module.__init__(self)
        text = text_settings(hf_config)
        self.args = self.make_args(text)
        self.shard = ShardPlan.for_rank(self.args, tp_rank(), tp_size())
        vision = VisionSettings(hf_config.get("vision_config") or {})
        if vision.out_hidden_size != self.args.hidden_size:
            raise ValueError(f"vision out_hidden_size={vision.out_hidden_size} differs from the text "
                             f"hidden_size={self.args.hidden_size}")
        self.vision = vision
        self.num_deepstack_levels = len(vision.deepstack_visual_indexes)
        if self.num_deepstack_levels > self.args.num_layers:
            raise ValueError(f"{self.num_deepstack_levels} DeepStack levels but only {self.args.num_layers} "
                             f"decoder layers")
        self.embed_width = self.args.hidden_size * (1 + self.num_deepstack_levels)
        self.image_token_id: int = hf_config.get("image_token_id", text.get("image_token_id", 151655))
        self.model = Qwen3VLModel(VisionTower(vision),
                                  TextModel(self.args, self.shard, max_model_len, mrope_section_of(text)))
        # CUDA graphs of the tower, per batch of image grids (set by use_encoder_graphs).
        self.vision_graphs: EncoderGraphs | None = None
        if not self.args.tie_word_embeddings:
            self.lm_head = nn.Linear(self.args.hidden_size, self.shard.vocab_shard, bias=False)

    @staticmethod
    def make_args(hf_config: dict[str, Any]) -> DecoderArgs:
        return DecoderArgs.from_hf_config(hf_config, qk_norm=True)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.language_model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm: MultiModalEmbeds | None = None) -> torch.Tensor:
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids)
        levels = None
        if mm is not None and mm.rows.numel():
            hidden = self.args.hidden_size
            embeds = mm.embeds.to(x.dtype)
            x = x.index_copy(0, mm.rows, embeds[:, :hidden])
            levels = embeds[:, hidden:].view(-1, self.num_deepstack_levels, hidden)
        residual = None
        for index, layer in enumerate(lm.layers):
            deepstack = levels is not None and index < self.num_deepstack_levels
            x, residual = layer(positions, x, residual, meta, for_norm=not deepstack)
            if deepstack:
                x, residual = (residual + x).index_add(0, mm.rows, levels[:, index]), None
        return lm.norm(x) if residual is None else lm.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = (self.model.language_model.embed_tokens.weight if self.args.tie_word_embeddings
                  else self.lm_head.weight)
        logits = all_gather_last_dim(linear(hidden, weight))
        return logits[..., :self.args.vocab_size]   # the model's dtype: the sampler reads it as it is

    # -- multimodal contract

    def use_encoder_graphs(self, max_tokens: int) -> None:
        """Run the vision tower from CUDA graphs, one per batch of image grids that recurs, for
        batches of up to ``max_tokens`` placeholder tokens."""
        tower = self.model.visual
        device = self.model.language_model.embed_tokens.weight.device
        self.vision_graphs = EncoderGraphs(tower.run, lambda grids: tower.prepare(list(grids), device),
                                           max_tokens * self.vision.spatial_merge_size ** 2)

    @torch.no_grad()
    def encode(self, items: list[MultiModalInput]) -> list[torch.Tensor]:
        """One [num_tokens, embed_width] tensor per item; all pixel items go through the vision
        tower in one call."""
        reference = self.model.language_model.embed_tokens.weight
        device, dtype = reference.device, reference.dtype
        items = [as_pixels(item, device) for item in items]
        outputs: list[torch.Tensor | None] = [None] * len(items)
        pixel_items: list[int] = []
        for i, item in enumerate(items):
            if item.source == "pixels":
                self._check_pixels(item)
                pixel_items.append(i)
            elif item.source == "embeds":
                if tuple(item.data.shape) != (item.num_tokens, self.embed_width):
                    raise ValueError(f"image embeds of shape {tuple(item.data.shape)}, expected "
                                     f"({item.num_tokens}, {self.embed_width}): the merger output and "
                                     f"{self.num_deepstack_levels} DeepStack levels side by side")
                outputs[i] = item.data.to(device=device, dtype=dtype)
            elif item.source == "features":
                raise ValueError("Qwen3-VL takes images as 'pixels' or 'embeds'; it has no separate "
                                 "projector for 'features'")
            else:
                raise ValueError(f"unknown multimodal source {item.source!r}")
        if pixel_items:
            pixels = torch.cat([items[i].data for i in pixel_items]).to(device=device, dtype=dtype)
            grids = [items[i].grid_thw for i in pixel_items]
            if self.vision_graphs is not None:
                encoded = self.vision_graphs(pixels, tuple(tuple(grid) for grid in grids))
            else:
                encoded = self.model.visual(pixels, grids)
            for i, part in zip(pixel_items, encoded.split([items[i].num_tokens for i in pixel_items])):
                outputs[i] = part
        return outputs

    def _check_pixels(self, item: MultiModalInput) -> None:
        if item.grid_thw is None:
            raise ValueError("a Qwen3-VL pixel item needs grid_thw")
        t, h, w = item.grid_thw
        m = self.vision.spatial_merge_size
        if h % m or w % m:
            raise ValueError(f"grid_thw {item.grid_thw}: height and width must be multiples of the "
                             f"spatial merge size {m}")
        if tuple(item.data.shape) != (t * h * w, self.vision.patch_width):
            raise ValueError(f"pixel_values of shape {tuple(item.data.shape)}, expected "
                             f"({t * h * w}, {self.vision.patch_width}) for grid_thw {item.grid_thw}")
        if item.num_tokens != t * h * w // m ** 2:
            raise ValueError(f"grid_thw {item.grid_thw} gives {t * h * w // m ** 2} tokens, the item "
                             f"has {item.num_tokens}")

    def mrope_positions(self, prompt_token_ids: list[int],
                        items: list[MultiModalInput]) -> tuple[torch.Tensor, int]:
        """Text advances all three axes together; an image's tokens take (frame, row, column) of
        the merged grid plus the running position, and the text after it continues from the running
        position plus the larger of the grid's merged height and width."""
        m = self.vision.spatial_merge_size
        parts: list[torch.Tensor] = []
        position = 0
        cursor = 0
        for item in items:
            if item.offset < cursor or item.end > len(prompt_token_ids):
                raise ValueError(f"multimodal item at [{item.offset}, {item.end}) overlaps another or "
                                 f"lies outside the prompt of {len(prompt_token_ids)} tokens")
            if item.grid_thw is None:
                raise ValueError("3-D positions of an image need its grid_thw")
            text_len = item.offset - cursor
            parts.append(torch.arange(position, position + text_len).expand(3, -1))
            position += text_len
            t, h, w = item.grid_thw[0], item.grid_thw[1] // m, item.grid_thw[2] // m
            if t * h * w != item.num_tokens:
                raise ValueError(f"grid_thw {item.grid_thw} gives {t * h * w} tokens, the item has "
                                 f"{item.num_tokens}")
            frame, row, col = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack([frame, row, col]).reshape(3, -1) + position)
            position += max(h, w)
            cursor = item.end
        parts.append(torch.arange(position, position + len(prompt_token_ids) - cursor).expand(3, -1))
        positions = torch.cat(parts, dim=1).to(torch.int64)
        delta = int(positions.max()) + 1 - len(prompt_token_ids) if positions.numel() else 0
        return positions, delta

    # -- checkpoint

    def _rank_part(self, name: str, tensor: Any) -> torch.Tensor:
        if name.startswith(VISION_PREFIX):
            part = tensor[:]   # replicated on every rank
            return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)
        if name == EMBED_TOKENS:
            return super()._rank_part("model.embed_tokens.weight", tensor)
        return super()._rank_part(name, tensor)
