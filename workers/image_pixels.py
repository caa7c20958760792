"""An "image_uint8" item's pixel values, made on the model's device: the resized uint8 image the
engine core sent becomes the float32 pixel values the family's vision encoder takes, the same to
the bit as the core's numpy preprocessing (its values come from the core's own table)."""

from __future__ import annotations

import dataclasses

import torch

from streamvlm.contract.protocol import PixelSteps
from workers.multimodal import MultiModalInput, tensor_from_data

NUM_CHANNELS = 3


def as_pixels(item: MultiModalInput, device: torch.device) -> MultiModalInput:
    """An "image_uint8" item as the "pixels" item it stands for (float32 on ``device``); any other
    item as it is. ValueError when the image does not fit its steps or grid."""
    if item.source != "image_uint8":
        return item
    steps = item.pixel_steps
    if steps is None:
        raise ValueError(f"image_uint8 item {item.hash!r} has no pixel_steps")
    image = item.data
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != NUM_CHANNELS:
        raise ValueError(f"image_uint8 item {item.hash!r} must be uint8 [H, W, {NUM_CHANNELS}], got "
                         f"{image.dtype} {list(image.shape)}")
    table = tensor_from_data(steps.value_table)
    if table.dtype != torch.float32 or tuple(table.shape) != (256, NUM_CHANNELS):
        raise ValueError(f"pixel_steps.value_table must be float32 [256, {NUM_CHANNELS}], got "
                         f"{table.dtype} {list(table.shape)}")
    values = _look_up(image.to(device, non_blocking=True), table.to(device))
    if steps.layout == "qwen_patches":
        pixel_values = _qwen_patches(values, steps, item)
    elif steps.layout == "channels_first":
        pixel_values = values.permute(2, 0, 1).contiguous()
    else:
        raise ValueError(f"unknown pixel layout {steps.layout!r}")
    return dataclasses.replace(item, source="pixels", data=pixel_values, pixel_steps=None)


def _look_up(image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, C] -> float32 [H, W, C]: value v of channel c becomes table[v, c]."""
    channel = torch.arange(NUM_CHANNELS, device=image.device)
    return table.flatten()[image.long() * NUM_CHANNELS + channel]


def _qwen_patches(values: torch.Tensor, steps: PixelSteps, item: MultiModalInput) -> torch.Tensor:
    """[H, W, C] -> [grid_h * grid_w, C * T * P * P], the layout of the core's QwenVLImageProcessor:
    rows merge window by merge window, each row (channel, time, patch row, patch col), a still image
    repeated over the temporal patch."""
    height, width, channels = values.shape
    p, m, t = steps.patch_size, steps.merge_size, steps.temporal_patch_size
    if min(p, m, t) < 1 or height % (p * m) or width % (p * m):
        raise ValueError(f"image of {width}x{height} pixels does not split into {p}-pixel patches in "
                         f"{m}x{m} merge windows")
    grid_h, grid_w = height // p, width // p
    if item.grid_thw is not None and tuple(item.grid_thw) != (1, grid_h, grid_w):
        raise ValueError(f"image of {width}x{height} pixels has grid (1, {grid_h}, {grid_w}), the item "
                         f"says {list(item.grid_thw)}")
    windows = values.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> (window row, window col, row in window, col in window, channel, patch row, patch col)
    windows = windows.permute(0, 3, 1, 4, 6, 2, 5)
    windows = windows.unsqueeze(5).expand(*windows.shape[:5], t, p, p)
    return windows.reshape(grid_h * grid_w, channels * t * p * p)
