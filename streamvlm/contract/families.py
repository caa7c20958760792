"""The model families streamvlm knows, one row each: what the engine core needs to prepare
their inputs and what the workers need to build them. Torch-free, so the engine core checks an
architecture without importing any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ImageProcessorKind = Literal["qwen_vl", "llava"]
# Config keys naming the image placeholder token: transformers' newer and older spellings.
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
# Qwen-VL's vision_config default when it does not set spatial_merge_size.
DEFAULT_SPATIAL_MERGE_SIZE = 2


@dataclass(frozen=True)
class ModelFamily:
    architecture: str                      # config.json "architectures" entry
    model_type: str                        # config.json "model_type"
    model_class: str | None                # "module:Class" of the workers' model; None: not served
    image_processor: ImageProcessorKind | None = None
    gguf_arch: str | None = None           # GGUF "general.architecture"

    @property
    def merges_patches(self) -> bool:
        """Qwen-VL merges each spatial_merge_size x spatial_merge_size block of patches into one
        token, and needs each image's patch grid (t, h, w)."""
        return self.image_processor == "qwen_vl"

    def merge_size(self, hf_config: Mapping[str, Any]) -> int:
        if not self.merges_patches:
            return 1
        vision = hf_config.get("vision_config") or {}
        return int(vision.get("spatial_merge_size", DEFAULT_SPATIAL_MERGE_SIZE))


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("LlamaForCausalLM", "llama", "workers.models.llama:LlamaForCausalLM",
                gguf_arch="llama"),
    ModelFamily("Qwen2ForCausalLM", "qwen2", "workers.models.qwen2:Qwen2ForCausalLM",
                gguf_arch="qwen2"),
    ModelFamily("Qwen3ForCausalLM", "qwen3", "workers.models.qwen3:Qwen3ForCausalLM",
                gguf_arch="qwen3"),
    ModelFamily("LlavaForConditionalGeneration", "llava",
                "workers.models.llava:LlavaForConditionalGeneration", image_processor="llava"),
    ModelFamily("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl",
                "workers.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
                image_processor="qwen_vl"),
    ModelFamily("Qwen3VLForConditionalGeneration", "qwen3_vl",
                "workers.models.qwen3_vl:Qwen3VLForConditionalGeneration",
                image_processor="qwen_vl"),
    # Image preprocessing only: their processors match the served Qwen-VL ones.
    ModelFamily("Qwen2VLForConditionalGeneration", "qwen2_vl", None, image_processor="qwen_vl"),
    ModelFamily("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", None,
                image_processor="qwen_vl"),
)

FAMILY_BY_ARCHITECTURE: dict[str, ModelFamily] = {f.architecture: f for f in FAMILIES}
ARCHITECTURE_BY_MODEL_TYPE: dict[str, str] = {f.model_type: f.architecture for f in FAMILIES}
SERVED_ARCHITECTURES: tuple[str, ...] = tuple(
    sorted(f.architecture for f in FAMILIES if f.model_class is not None))
ARCHITECTURE_BY_GGUF_ARCH: dict[str, str] = {
    f.gguf_arch: f.architecture for f in FAMILIES if f.gguf_arch is not None}


def architecture_of(hf_config: Mapping[str, Any]) -> str:
    """The checkpoint's architecture name: its first "architectures" entry, else the one its
    model_type stands for, else a description for error messages."""
    architectures = hf_config.get("architectures") or []
    if architectures:
        return str(architectures[0])
    model_type = hf_config.get("model_type")
    if model_type in ARCHITECTURE_BY_MODEL_TYPE:
        return ARCHITECTURE_BY_MODEL_TYPE[model_type]
    return f"model type {model_type!r}" if model_type else "a config without architectures or model_type"


def family_of(hf_config: Mapping[str, Any]) -> ModelFamily | None:
    return FAMILY_BY_ARCHITECTURE.get(architecture_of(hf_config))


def served_family(hf_config: Mapping[str, Any]) -> ModelFamily:
    """The family whose model the workers build for this checkpoint; ValueError if none."""
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        family = FAMILY_BY_ARCHITECTURE.get(arch)
        if family is not None and family.model_class is not None:
            return family
    raise ValueError(f"unsupported architecture {architectures or hf_config.get('model_type')}; "
                     f"supported: {', '.join(SERVED_ARCHITECTURES)}")


def image_token_id(hf_config: Mapping[str, Any]) -> int | None:
    token = hf_config.get(IMAGE_TOKEN_KEYS[0], hf_config.get(IMAGE_TOKEN_KEYS[1]))
    return None if token is None else int(token)
