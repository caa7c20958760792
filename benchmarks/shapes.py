"""Config shapes of real models, for benchmarks with random weights (load_format="dummy")."""

from __future__ import annotations

import json
import os
import tempfile

SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       tie_word_embeddings=True, eos_token_id=151645, hidden_act="silu",
                       torch_dtype="bfloat16"),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                     hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     tie_word_embeddings=False, eos_token_id=151645, hidden_act="silu",
                     torch_dtype="bfloat16"),
    "qwen2.5-vl-3b": dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True, torch_dtype="bfloat16",
        text_config=dict(model_type="qwen2_5_vl_text", vocab_size=151936, hidden_size=2048,
                         intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         hidden_act="silu", tie_word_embeddings=True, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")),
    "qwen3-vl-2b": dict(
        architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl",
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True, torch_dtype="bfloat16",
        text_config=dict(model_type="qwen3_vl_text", vocab_size=151936, hidden_size=2048,
                         intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                           hidden_act="gelu_pytorch_tanh")),
}
# Image preprocessing of the VLM shapes (their preprocessor_config.json).
PREPROCESSORS: dict[str, dict] = {
    "qwen2.5-vl-3b": dict(image_processor_type="Qwen2VLImageProcessor", do_resize=True, do_rescale=True,
                          do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255,
                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711], patch_size=14, temporal_patch_size=2,
                          merge_size=2, min_pixels=3136, max_pixels=12845056, resample=3),
    "qwen3-vl-2b": dict(image_processor_type="Qwen2VLImageProcessorFast", do_resize=True, do_rescale=True,
                        do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255,
                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], patch_size=16,
                        temporal_patch_size=2, merge_size=2,
                        size={"shortest_edge": 65536, "longest_edge": 16777216}, resample=3),
}


def shape_folder(name: str) -> str:
    """A folder holding only config.json (and preprocessor_config.json for a VLM) for the named shape."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    folder = tempfile.mkdtemp(prefix=f"streamvlm-{name}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[name], f)
    if name in PREPROCESSORS:
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(PREPROCESSORS[name], f)
    return folder
