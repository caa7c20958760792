from __future__ import annotations

from typing import Any

from torch import nn

from workers.models.llama import LlamaForCausalLM
from workers.models.llava import LlavaForConditionalGeneration
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from workers.models.qwen3 import Qwen3ForCausalLM
from workers.models.qwen3_vl import Qwen3VLForConditionalGeneration

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3VLForConditionalGeneration": Qwen3VLForConditionalGeneration,
}


def model_class(hf_config: dict[str, Any]) -> type[nn.Module]:
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"unsupported architecture {architectures or hf_config.get('model_type')}; "
                     f"supported: {', '.join(sorted(MODELS))}")
