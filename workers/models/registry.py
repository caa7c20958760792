from __future__ import annotations

from typing import Any

from torch import nn

from workers.models.llama import LlamaForCausalLM
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(hf_config: dict[str, Any]) -> type[nn.Module]:
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"unsupported architecture {architectures or hf_config.get('model_type')}; "
                     f"supported: {', '.join(sorted(MODELS))}")
