"""Tiny random LLaVA checkpoints (transformers' LlavaForConditionalGeneration, saved with
save_pretrained) with a tiny tokenizer and the vision tower's image processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.conftest import ARCHS, BASE
from tests.tiny_tokenizer import build_tiny_tokenizer, vlm_chat_template

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 448   # the tiny tokenizer's first extra special token
IMAGE_SIZE = 32
PATCH_SIZE = 8
TEXT_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
VISION = {
    "clip": dict(model_type="clip_vision_model", hidden_act="quick_gelu"),
    "siglip": dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh"),
}
VISION_BASE = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=3, num_attention_heads=4, initializer_range=0.1)
# What the released checkpoints of each tower use: CLIP's second-to-last layer without the class
# token, SigLIP's last layer whole.
FEATURES = {
    "clip": dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "siglip": dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
}


def llava_config(text: str = "llama", vision: str = "clip", **overrides: Any):
    """The LlavaConfig of a tiny checkpoint; ``text_config`` / ``vision_config`` overrides are
    merged into the sub-configs, the others set top-level keys."""
    from transformers import LlavaConfig

    _, _, text_extra = ARCHS[text]
    text_config = {**BASE, **text_extra, "model_type": TEXT_MODEL_TYPES[text],
                   **overrides.pop("text_config", {})}
    vision_config = {**VISION_BASE, **VISION[vision], **overrides.pop("vision_config", {})}
    return LlavaConfig(text_config=text_config, vision_config=vision_config, image_token_index=IMAGE_TOKEN_ID,
                       **{**FEATURES[vision], **overrides})


def image_processor(vision: str, image_size: int = IMAGE_SIZE):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    if vision == "clip":
        return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def build_llava_checkpoint(path: Path, text: str = "llama", vision: str = "clip", **overrides: Any) -> Path:
    """A seeded tiny LLaVA in ``path``: text vocab 512, hidden 64, 2 layers, 4 heads, 2 KV heads;
    a 3-layer vision tower of width 32 on 32x32 images in 8x8 patches (16 image tokens)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(text, vision, **overrides)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    tokenizer = build_tiny_tokenizer(path, [IMAGE_TOKEN], vlm_chat_template(IMAGE_TOKEN))
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise RuntimeError(f"{IMAGE_TOKEN} did not get id {IMAGE_TOKEN_ID}")
    image_processor(vision, config.vision_config.image_size).save_pretrained(path)
    return path
