"""The model class of a checkpoint, from the contract's family table."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from streamvlm.contract.families import served_family


def model_class(hf_config: dict[str, Any]) -> type[nn.Module]:
    module_name, _, class_name = served_family(hf_config).model_class.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
