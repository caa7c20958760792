from __future__ import annotations

from typing import Any

from workers.models.llama import DecoderArgs, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on the q/k/v projections (none on o_proj)."""

    @staticmethod
    def make_args(hf_config: dict[str, Any]) -> DecoderArgs:
        return DecoderArgs.from_hf_config(hf_config, qkv_bias=True, o_bias=False)
