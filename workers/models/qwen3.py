from __future__ import annotations

from typing import Any

from workers.models.llama import DecoderArgs, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with per-head RMSNorm on queries and keys before rotary, and an explicit head_dim."""

    @staticmethod
    def make_args(hf_config: dict[str, Any]) -> DecoderArgs:
        return DecoderArgs.from_hf_config(hf_config, qk_norm=True)
