"""Build a model and fill its weights from safetensors, GGUF, or random values ("dummy")."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator

import torch
from torch import nn

from streamvlm.contract.model_source import ModelSource
from workers.distributed import tp_size
from workers.gguf_loader import GGUFCheckpoint
from workers.models.registry import model_class


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no .safetensors files in {folder}")
    for path in files:
        if not os.path.exists(path):
            raise ValueError(f"checkpoint shard {path} listed in the index is missing")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                # With tensor parallelism, a lazy slice: the model reads only its rank's part.
                yield name, (f.get_slice(name) if tp_size() > 1 else f.get_tensor(name))


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


@contextlib.contextmanager
def _without_default_init() -> Iterator[None]:
    """Skip nn.Linear / nn.Embedding random init: every weight is overwritten anyway."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def load_model(source: ModelSource, load_format: str, max_model_len: int,
               device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    cls = model_class(source.hf_config)
    with torch.device(device), _without_default_init():
        model = cls(source.hf_config, max_model_len)
    # Parameters only: the rotary cos/sin caches stay float32, as in the reference.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif source.kind == "gguf":
        model.load_weights(GGUFCheckpoint(source.gguf).tensors())
    else:
        model.load_weights(iter_safetensors(source.path))
    if device.type == "cuda":
        pack_weights_for_device(model)
    return model.eval()


def pack_weights_for_device(model: nn.Module) -> None:
    """Modules that keep their checkpoint layout for loading and prefer another on the GPU
    (``pack_weights_for_device``) repack their weights once, after loading."""
    for module in list(model.modules()):
        pack = getattr(module, "pack_weights_for_device", None)
        if pack is not None:
            pack()
