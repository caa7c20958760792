"""LLaVA: chosen hidden states of a CLIP or SigLIP vision tower, through a two-layer MLP projector,
take the place of the image placeholder tokens of a Llama, Qwen2 or Qwen3 decoder.

Checkpoint names: what transformers 5 saves (``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.*``, ``multi_modal_projector.*``), its in-memory layout (``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.*``) and the older hub layout
(``vision_tower.vision_model.*``) are all accepted. Parameters here are named like the text models'
(``model.*``, ``lm_head.weight``) plus ``vision_tower.*`` and ``multi_modal_projector.*``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.encoder_graphs import EncoderGraphs
from workers.image_pixels import as_pixels
from workers.models.llama import DecoderArgs, LlamaForCausalLM
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM
from workers.models.vision_common import activation
from workers.models.vision_encoders import VisionArgs, VisionTransformer
from workers.multimodal import MultiModalInput

TEXT_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}
VISION_PREFIX = "vision_tower."
# Checkpoint prefix -> ours; the first match wins, so longer prefixes come first.
CHECKPOINT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", VISION_PREFIX),
    ("model.vision_tower.", VISION_PREFIX),
    ("vision_tower.vision_model.", VISION_PREFIX),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
SELECT_STRATEGIES = ("default", "full")


@dataclass(frozen=True)
class LlavaArgs:
    text_config: dict[str, Any]          # the decoder's config.json settings, defaults filled in
    vision: VisionArgs
    image_token_id: int
    feature_layers: tuple[int, ...]      # vision hidden states whose rows are concatenated, as 0..num_layers
    drop_class_token: bool               # vision_feature_select_strategy "default": the first row goes
    projector_act: str
    projector_bias: bool

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LlavaArgs:
        # Old checkpoints leave out most settings: transformers' config classes know their defaults.
        from transformers import LlavaConfig

        config = LlavaConfig.from_dict(copy.deepcopy(hf_config))
        text = config.text_config.to_dict()
        if text.get("model_type") not in TEXT_MODELS:
            raise ValueError(f"unsupported LLaVA language model {text.get('model_type')!r}; "
                             f"supported: {', '.join(TEXT_MODELS)}")
        # transformers ties the output embedding when either config asks for it.
        text["tie_word_embeddings"] = bool(text.get("tie_word_embeddings") or hf_config.get("tie_word_embeddings"))
        vision = VisionArgs.from_hf_config(config.vision_config.to_dict())
        strategy = config.vision_feature_select_strategy
        if strategy not in SELECT_STRATEGIES:
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}; "
                             f"supported: {', '.join(SELECT_STRATEGIES)}")
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not layers:
            raise ValueError("vision_feature_layer selects no hidden state")
        activation(config.projector_hidden_act)
        return cls(text_config=text, vision=vision, image_token_id=int(config.image_token_index),
                   feature_layers=tuple(vision.hidden_state_index(i) for i in layers),
                   drop_class_token=strategy == "default", projector_act=config.projector_hidden_act,
                   projector_bias=bool(config.multimodal_projector_bias))

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_positions - int(self.drop_class_token)

    @property
    def feature_width(self) -> int:
        """Columns of the selected vision features, the projector's input."""
        return self.vision.hidden_size * len(self.feature_layers)


class MultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.act_fn = activation(act)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_fn(self.linear_1(features)))


def our_name(name: str) -> str:
    for prefix, ours in CHECKPOINT_PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return name


def is_decoder_name(name: str) -> bool:
    """Decoder tensors are split across tensor-parallel ranks; the vision tower and projector never are."""
    return name.startswith("model.") or name.startswith("lm_head.")


class LlavaForConditionalGeneration(LlamaForCausalLM):
    uses_mrope = False

    def __init__(self, hf_config: dict[str, Any], max_model_len: int) -> None:
        llava = LlavaArgs.from_hf_config(hf_config)
        super().__init__(llava.text_config, max_model_len)
        self.llava = llava
        self.image_token_id = llava.image_token_id
        self.embed_width = self.args.hidden_size
        self.tokens_per_image = llava.tokens_per_image
        self.vision_tower = VisionTransformer(llava.vision, num_layers=max(llava.feature_layers))
        self.multi_modal_projector = MultiModalProjector(llava.feature_width, self.args.hidden_size,
                                                         llava.projector_act, llava.projector_bias)
        # CUDA graphs of tower and projector, per number of images (set by use_encoder_graphs).
        self.vision_graphs: EncoderGraphs | None = None

    @staticmethod
    def make_args(hf_config: dict[str, Any]) -> DecoderArgs:
        """The decoder's args, from the text config as its own model class reads them."""
        return TEXT_MODELS[hf_config["model_type"]].make_args(hf_config)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features [B, tokens_per_image, hidden_size] of a [B, C, H, W] pixel batch."""
        states = self.vision_tower(pixel_values, self.llava.feature_layers)
        if self.llava.drop_class_token:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def use_encoder_graphs(self, max_tokens: int) -> None:
        """Run tower and projector from CUDA graphs, one per number of images that recurs (every
        image has the same size), for batches of up to ``max_tokens`` placeholder tokens."""
        self.vision_graphs = EncoderGraphs(lambda pixels, _: self.image_features(pixels), lambda count: None,
                                           max(1, max_tokens // self.tokens_per_image))

    def encode(self, items: list[MultiModalInput]) -> list[torch.Tensor]:
        """One [num_tokens, hidden_size] tensor per item. "pixels": one image's [C, H, W] pixel
        values; "embeds": the projected rows themselves; "features": the selected vision hidden
        states [num_tokens, feature_width] (rows of the feature layers concatenated, the class
        token dropped as the select strategy says), before the projector."""
        weight = self.multi_modal_projector.linear_1.weight
        device, dtype = weight.device, weight.dtype
        items = [as_pixels(item, device) for item in items]
        outputs: list[torch.Tensor | None] = [None] * len(items)
        pixel_indexes: list[int] = []
        for index, item in enumerate(items):
            if item.source == "embeds":
                self._check_shape(item, (item.num_tokens, self.embed_width))
                outputs[index] = item.data.to(device, dtype)
            elif item.modality != "image":
                raise ValueError(f"LLaVA encodes images only, got modality {item.modality!r}")
            elif item.source == "pixels":
                vision = self.llava.vision
                self._check_shape(item, (vision.num_channels, vision.image_size, vision.image_size))
                if item.num_tokens != self.tokens_per_image:
                    raise ValueError(f"an image gives {self.tokens_per_image} tokens, the item has {item.num_tokens}")
                pixel_indexes.append(index)
            elif item.source == "features":
                self._check_shape(item, (item.num_tokens, self.llava.feature_width))
                outputs[index] = self.multi_modal_projector(item.data.to(device, dtype))
            else:
                raise ValueError(f"unknown multimodal source {item.source!r}")
        if pixel_indexes:
            pixels = torch.stack([items[i].data for i in pixel_indexes]).to(device, dtype)
            if self.vision_graphs is not None:
                features = self.vision_graphs(pixels, pixels.shape[0]).unbind(0)
            else:
                features = self.image_features(pixels).unbind(0)
            for index, rows in zip(pixel_indexes, features):
                # Own storage per item: the encoder cache keeps items, not the whole batch.
                outputs[index] = rows.clone() if len(features) > 1 else rows
        return outputs

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in (any layout of the module docstring); ValueError on an
        unknown, mis-shaped or missing tensor. Tensors of vision layers past the deepest feature
        layer, the post-layernorm and SigLIP's head may be present or not."""
        super().load_weights(self._used_tensors(weights))

    def _used_tensors(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        for name, tensor in weights:
            name = our_name(name)
            if name.startswith(VISION_PREFIX) and self.vision_tower.is_unused_tensor(name[len(VISION_PREFIX):]):
                continue
            yield name, tensor

    def _locate(self, name: str, params: dict[str, nn.Parameter]) -> torch.Tensor:
        if not is_decoder_name(name):
            return params[name].data   # vision projections are not fused
        return super()._locate(name, params)

    def _rank_part(self, name: str, tensor: Any) -> torch.Tensor:
        if not is_decoder_name(name):
            part = tensor[:]            # replicated on every rank
            return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)
        return super()._rank_part(name, tensor)

    @staticmethod
    def _check_shape(item: MultiModalInput, shape: tuple[int, ...]) -> None:
        if tuple(item.data.shape) != shape:
            raise ValueError(f"{item.source} item {item.hash!r} has shape {tuple(item.data.shape)}, "
                             f"expected {shape}")
