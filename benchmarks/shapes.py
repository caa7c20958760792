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
}


def shape_folder(name: str) -> str:
    """A folder holding only config.json for the named shape."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    folder = tempfile.mkdtemp(prefix=f"streamvlm-{name}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[name], f)
    return folder
