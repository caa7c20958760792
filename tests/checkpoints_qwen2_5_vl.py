"""A tiny random Qwen2.5-VL checkpoint (transformers' save_pretrained), with a tokenizer that has
the vision special tokens and an image processor config, built in about a second.

Sizes: vocab 512, text hidden 64 (2 layers, 4 heads, 2 KV heads, head_dim 16); vision depth 4
(full attention in blocks 1 and 3, windowed elsewhere), hidden 32, patch 4, merge 2, windows of
3 x 3 merged patches. A 64 x 48 image becomes a 12 x 16 patch grid, 48 LM tokens, 6 windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_tokenizer import build_tiny_tokenizer, vlm_chat_template

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2,
    pad_token_id=0, initializer_range=0.1,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
VISION_CONFIG: dict[str, Any] = dict(
    depth=4, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=4, temporal_patch_size=2,
    spatial_merge_size=2, window_size=24, out_hidden_size=64, fullatt_block_indexes=[1, 3], initializer_range=0.1)
# Pixel bounds of the resized image: 16 x 16 up to 128 x 128.
MIN_PIXELS, MAX_PIXELS = 16 * 16, 128 * 128


def build_qwen2_5_vl_checkpoint(path: Path, **overrides: Any) -> Path:
    """Save a random Qwen2_5_VLForConditionalGeneration, its tokenizer and preprocessor config to
    ``path``. ``overrides`` are Qwen2_5_VLConfig arguments; ``text_config`` and ``vision_config``
    dicts update the defaults above rather than replace them."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = build_tiny_tokenizer(path, [VISION_START, VISION_END, IMAGE_PAD],
                                     vlm_chat_template(IMAGE_PLACEHOLDER))
    token_ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id"),
                         tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD]), strict=True))
    text_config = {**TEXT_CONFIG, **overrides.pop("text_config", {})}
    vision_config = {**VISION_CONFIG, **overrides.pop("vision_config", {})}
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                              **{"tie_word_embeddings": False, **token_ids, **overrides})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0: make them random too, so that loading them is tested.
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    vision = config.vision_config
    Qwen2VLImageProcessorPil(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                             merge_size=vision.spatial_merge_size, min_pixels=MIN_PIXELS,
                             max_pixels=MAX_PIXELS).save_pretrained(path)
    return path
