"""A tiny random Qwen3-VL checkpoint (transformers layout) with a tokenizer and an image
processor config, for model-level and end-to-end tests.

With the processor settings here, a 64x48 image becomes a 12x16 patch grid, 48 image tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_tokenizer import build_tiny_tokenizer, vlm_chat_template

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5],
                     "mrope_interleaved": True},
)
VISION_CONFIG: dict[str, Any] = dict(
    depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
    temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=100,
    deepstack_visual_indexes=[0, 1],
)
# As Qwen3-VL's processor: mean and std 0.5; min/max pixels kept small for tests.
IMAGE_PROCESSOR: dict[str, Any] = dict(
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
)


def build_qwen3_vl_checkpoint(path: Path, **overrides: Any) -> Path:
    """Save a seeded random Qwen3VLForConditionalGeneration, tokenizer and preprocessor config
    to ``path``. ``text_config`` / ``vision_config`` overrides are merged into the defaults, other
    keys go to the top-level config (e.g. ``tie_word_embeddings=True``)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    overrides = dict(overrides)
    text = {**TEXT_CONFIG, **overrides.pop("text_config", {})}
    vision = {**VISION_CONFIG, **overrides.pop("vision_config", {})}
    text["tie_word_embeddings"] = overrides.get("tie_word_embeddings", False)

    tokenizer = build_tiny_tokenizer(path, [VISION_START, VISION_END, IMAGE_PAD],
                                     vlm_chat_template(IMAGE_PLACEHOLDER))
    start_id, end_id, image_id = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD])
    # Also written to generation_config.json by save_pretrained.
    text.setdefault("eos_token_id", tokenizer.eos_token_id)
    text.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=image_id,
                           vision_start_token_id=start_id, vision_end_token_id=end_id,
                           **{"tie_word_embeddings": False, **overrides})
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)

    processor = Qwen2VLImageProcessorPil(patch_size=vision["patch_size"],
                                         temporal_patch_size=vision["temporal_patch_size"],
                                         merge_size=vision["spatial_merge_size"], **IMAGE_PROCESSOR)
    processor.save_pretrained(path)
    return path
