"""Multimodal inputs inside a worker: decoded items, and the contract that a vision-language
model fulfils for the model runner.

A VLM model class (workers/models/) offers, besides the text model's interface:

- ``image_token_id: int``: the placeholder token its images expand to;
- ``embed_width: int``: columns of one encoder-output row (hidden_size, or hidden_size times
  1 + the number of DeepStack levels for Qwen3-VL);
- ``encode(items) -> list[Tensor]``: one [item.num_tokens, embed_width] tensor per item, in the
  model's dtype on its device. "image_uint8" items become pixel items on the device first
  (workers.image_pixels.as_pixels); pixel items of several requests run through the vision tower
  together; "embeds" items pass through; "features" items go through the projector for their
  modality;
- ``forward(input_ids, positions, meta, mm=None)``: ``mm`` holds the rows of the step's tokens
  that take encoder output instead of token embeddings;
- ``uses_mrope: bool``, and where it is true
  ``mrope_positions(prompt_token_ids, items) -> (Tensor[3, P] int64, delta)``: the 3-D positions of
  the prompt; a generated token at index i >= P has position i + delta on all three axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamvlm.contract.protocol import MultiModalItem, PixelSteps, TensorData

# Wire dtype names (TensorData, KV frames, the config's dtype) -> torch dtypes; the one such table.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64, "uint8": torch.uint8, "int64": torch.int64}


def tensor_from_data(data: TensorData) -> torch.Tensor:
    dtype = TORCH_DTYPES.get(data.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {data.dtype!r}")
    count = 1
    for dim in data.shape:
        count *= dim
    if count * dtype.itemsize != len(data.data):
        raise ValueError(f"tensor of shape {data.shape} and dtype {data.dtype} needs "
                         f"{count * dtype.itemsize} bytes, got {len(data.data)}")
    if count == 0:
        return torch.empty(data.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data.data), dtype=dtype).reshape(data.shape)


@dataclass
class MultiModalInput:
    """One item of a request as the worker holds it (data on the CPU)."""

    hash: str
    offset: int
    num_tokens: int
    source: str
    modality: str
    data: torch.Tensor
    grid_thw: tuple[int, int, int] | None = None
    pixel_steps: PixelSteps | None = None   # source "image_uint8" (workers.image_pixels)

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    @classmethod
    def from_item(cls, item: MultiModalItem) -> MultiModalInput:
        grid = tuple(item.grid_thw) if item.grid_thw is not None else None
        return cls(item.hash, item.offset, item.num_tokens, item.source, item.modality,
                   tensor_from_data(item.data), grid, item.pixel_steps)


@dataclass
class MultiModalEmbeds:
    """Encoder output for one step: row i of ``embeds`` replaces the embedding of the step's
    token ``rows[i]`` (an index into the step's flattened tokens)."""

    rows: torch.Tensor     # [n] int64, on the model's device
    embeds: torch.Tensor   # [n, embed_width], model dtype
