import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from workers.layers.rotary import RotaryEmbedding, rope_parameters_from_config

HEAD_DIM = 16
MAX_POS = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2

VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "attention_factor": 1.3,
    },
    "yarn_mscale": {
        "rope_type": "yarn",
        "rope_theta": 1000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "yarn_no_original": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def _hf_config(rope_parameters: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(rope_parameters),  # LlamaConfig fills defaults into the dict in place
    )


def _hf_rotate(config: LlamaConfig, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    rope = LlamaRotaryEmbedding(config)
    cos, sin = rope(q, positions[None])
    return apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)


def _random_qk(n: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, NUM_HEADS, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_transformers(name: str) -> None:
    config = _hf_config(VARIANTS[name])
    params = rope_parameters_from_config(config.to_dict())
    positions = torch.arange(MAX_POS)
    q, k = _random_qk(MAX_POS)

    ours = RotaryEmbedding(HEAD_DIM, params, MAX_POS, max_model_len=MAX_POS)
    q_out, k_out = ours(positions, q, k)
    q_ref, k_ref = _hf_rotate(config, positions, q, k)

    assert q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-6, rtol=0)


def test_positions_out_of_order() -> None:
    config = _hf_config(VARIANTS["yarn"])
    ours = RotaryEmbedding(HEAD_DIM, rope_parameters_from_config(config.to_dict()), MAX_POS, MAX_POS)
    positions = torch.tensor([5, 0, 127, 5, 64])
    q, k = _random_qk(len(positions))
    q_out, k_out = ours(positions, q, k)
    q_ref, k_ref = _hf_rotate(config, positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-6, rtol=0)


def test_dynamic_beyond_original_length_uses_fixed_scaling() -> None:
    # HF recomputes dynamic NTK for seq_len = max(positions) + 1; a batch spanning max_model_len
    # therefore matches our fixed scaling at seq_len = max_model_len.
    max_model_len = 2 * MAX_POS
    config = _hf_config(VARIANTS["dynamic"])
    ours = RotaryEmbedding(HEAD_DIM, rope_parameters_from_config(config.to_dict()), MAX_POS, max_model_len)
    positions = torch.arange(max_model_len)
    q, k = _random_qk(max_model_len)
    q_out, k_out = ours(positions, q, k)
    q_ref, k_ref = _hf_rotate(config, positions, q, k)
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_ref, atol=1e-6, rtol=0)


def test_partial_rotary_against_hand_computation() -> None:
    theta, rotary_dim = 10000.0, HEAD_DIM // 2
    params = rope_parameters_from_config({"rope_theta": theta, "partial_rotary_factor": 0.5})
    ours = RotaryEmbedding(HEAD_DIM, params, MAX_POS, MAX_POS)
    assert ours.rotary_dim == rotary_dim

    positions = torch.tensor([0, 1, 7, 100])
    q, k = _random_qk(len(positions))
    q_out, k_out = ours(positions, q, k)

    def expected(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        out = x.clone()
        half = rotary_dim // 2
        for n, pos in enumerate(positions.tolist()):
            for i in range(half):
                angle = pos / theta ** (2 * i / rotary_dim)
                c, s = math.cos(angle), math.sin(angle)
                a, b = x[n, :, i], x[n, :, i + half]
                out[n, :, i] = a * c - b * s
                out[n, :, i + half] = b * c + a * s
        return out.float()

    torch.testing.assert_close(q_out, expected(q), atol=1e-5, rtol=0)
    torch.testing.assert_close(k_out, expected(k), atol=1e-5, rtol=0)
    # The non-rotary tail passes through untouched.
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])


def test_bfloat16_input() -> None:
    ours = RotaryEmbedding(HEAD_DIM, rope_parameters_from_config({"rope_parameters": VARIANTS["yarn"]}), MAX_POS, 256)
    q, k = _random_qk(10, torch.bfloat16)
    positions = torch.arange(200, 210)
    q_out, k_out = ours(positions, q, k)
    assert q_out.dtype == torch.bfloat16 and k_out.dtype == torch.bfloat16
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert ours.cos_cache.dtype == torch.float32 and ours.cos_cache.shape == (256, HEAD_DIM)
    assert "cos_cache" not in ours.state_dict()


def test_rope_parameters_old_style() -> None:
    params = rope_parameters_from_config(
        {
            "max_position_embeddings": 131072,
            "rope_theta": 500000,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
        }
    )
    assert params == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "partial_rotary_factor": 1.0,
    }

    params = rope_parameters_from_config({"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert params == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 1.0}

    params = rope_parameters_from_config({"rope_theta": 1e6, "rope_scaling": None, "partial_rotary_factor": 0.25})
    assert params == {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}


def test_rope_parameters_new_style() -> None:
    params = rope_parameters_from_config(
        {
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "partial_rotary_factor": 0.5},
        }
    )
    assert params == {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 4096,  # falls back to max_position_embeddings, as in transformers
    }
    # A top-level original_max_position_embeddings (Phi3 style) takes priority, as in transformers.
    params = rope_parameters_from_config(
        {
            "original_max_position_embeddings": 1024,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
        }
    )
    assert params["original_max_position_embeddings"] == 1024
    assert params["rope_theta"] == 10000.0

    # A transformers-5 serialized LlamaConfig round-trips.
    config = _hf_config(VARIANTS["llama3"])
    assert rope_parameters_from_config(config.to_dict()) == VARIANTS["llama3"] | {"partial_rotary_factor": 1.0}


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}, "su"),
    ],
)
def test_unsupported_rope_type(config: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        rope_parameters_from_config(config)
    with pytest.raises(ValueError, match=name):
        RotaryEmbedding(HEAD_DIM, {"rope_type": name}, MAX_POS, MAX_POS)
