"""Images and precomputed embeddings in prompts: from chat content parts or an ``images`` list
to the MultiModalItems a worker encodes, with the placeholder tokens expanded.

Content parts: OpenAI ``{"type": "image_url", "image_url": {"url": ...}}`` (or a plain string),
Hugging Face ``{"type": "image", "image": ...}`` (also ``"url"`` or ``"path"``), and precomputed
``{"type": "image_embeds", "image_embeds": array, "image_grid_thw": [t, h, w]}`` (encoder
output, already in the language model's hidden size) or ``{"type": "image_features",
"image_features": array, ...}`` (vision features that go through the checkpoint's projector).
Arrays are numpy arrays or torch tensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.families import architecture_of, family_of, image_token_id
from streamvlm.inputs.pixel_budget import PixelBudget
from streamvlm.contract.model_source import ModelSource
from streamvlm.contract.protocol import MultiModalItem, TensorData

if TYPE_CHECKING:
    from streamvlm.inputs.images import PendingImage

ItemSource = Literal["pixels", "embeds", "features"]
IMAGE_PART_TYPES = ("image_url", "image", "input_image")
EMBEDS_PART_TYPES = {"image_embeds": "embeds", "image_features": "features"}
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Threads decoding and resizing images: Pillow and numpy release the GIL in that work, so several run at
# once; more than the cores cannot help, and the pixel budget bounds what they hold in memory.
MAX_IMAGE_THREADS = 8


@dataclass(frozen=True)
class ImageRef:
    """One image of a prompt as the user gave it, before it is loaded."""

    source: ItemSource
    value: Any                        # an image source, or an array for embeds/features
    grid_thw: list[int] | None = None


def is_media_part(part: Any) -> bool:
    kind = part.get("type") if isinstance(part, dict) else None
    return isinstance(kind, str) and (kind in IMAGE_PART_TYPES or kind in EMBEDS_PART_TYPES)


def parse_media_part(part: dict[str, Any]) -> ImageRef:
    kind = part.get("type")
    if kind in EMBEDS_PART_TYPES:
        if kind not in part:
            raise ValueError(f"a {kind!r} part needs its array under {kind!r}")
        grid = part.get("image_grid_thw")
        if grid is not None:
            grid = _grid(grid)
        return ImageRef(EMBEDS_PART_TYPES[kind], part[kind], grid)
    if kind == "image_url" or kind == "input_image":
        value = part.get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
    else:
        value = next((part[key] for key in ("image", "url", "path", "image_url") if part.get(key)
                      is not None), None)
    if value is None:
        raise ValueError(f"the {kind!r} part has no image (expected a url or an image)")
    return ImageRef("pixels", value)


def image_ref(value: Any) -> ImageRef:
    """An entry of a prompt's ``images`` list: an image source or a content part."""
    if isinstance(value, ImageRef):
        return value
    if isinstance(value, dict):
        if not is_media_part(value):
            raise ValueError("an images entry is an image (PIL, bytes, data URL, path or URL) "
                             "or a content part of type 'image', 'image_url', 'image_embeds' or "
                             "'image_features'")
        return parse_media_part(value)
    return ImageRef("pixels", value)


def _grid(value: Any) -> list[int]:
    grid = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    grid = grid[0] if grid and isinstance(grid[0], list) else grid
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"image_grid_thw must be three positive integers, got {value!r}")
    return grid


def tensor_data(array: Any) -> TensorData:
    """A numpy array or torch tensor as TensorData (no torch import unless given a tensor)."""
    if type(array).__module__.startswith("torch"):
        import torch

        tensor = array.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        shape = list(tensor.shape)
    else:
        import numpy as np

        if not isinstance(array, np.ndarray):
            raise ValueError(f"embeddings must be a numpy array or a torch tensor, got "
                             f"{type(array).__name__}")
        dtype, shape = array.dtype.name, list(array.shape)
        raw = np.ascontiguousarray(array).tobytes()
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"embeddings of dtype {dtype} are not supported: use one of "
                         f"{', '.join(SUPPORTED_DTYPES)}")
    return TensorData(dtype, shape, raw)


def content_hash(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


class MultiModalPreparer:
    """Loads, checks and preprocesses a prompt's images, and expands its placeholders."""

    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int) -> None:
        self.limits = config.image
        self.max_model_len = max_model_len
        self.pixel_budget = PixelBudget(config.limits.max_pending_image_pixels)
        hf_config = source.hf_config
        self.architecture = architecture_of(hf_config)
        token = image_token_id(hf_config)
        preprocessor = source.preprocessor_config
        self.image_token_id: int | None = None
        self.image_processor = None
        if token is not None and preprocessor is not None:
            from streamvlm.inputs.image_processing import image_processor_for

            self.image_token_id = token
            self.image_processor = image_processor_for(hf_config, preprocessor)
        family = family_of(hf_config)
        self.merge_size = family.merge_size(hf_config) if family is not None else 1
        self.needs_grid = family is not None and family.merges_patches
        # Image work has threads of its own, so that it never queues behind tokenization in the loop's
        # default executor (nor tokenization behind it). Threads start with the first image.
        self._executor = ThreadPoolExecutor(max_workers=min(MAX_IMAGE_THREADS, os.cpu_count() or 1),
                                            thread_name_prefix="streamvlm-image")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def accepts_images(self) -> bool:
        return self.image_processor is not None

    def check_count(self, refs: list[ImageRef]) -> None:
        if refs and not self.accepts_images:
            raise ValueError("this model does not accept image input")
        if len(refs) > self.limits.max_images_per_request:
            raise ValueError(f"too many images: {len(refs)} in one request, "
                             f"max_images_per_request={self.limits.max_images_per_request}")

    async def build(self, token_ids: list[int], refs: list[ImageRef]
                    ) -> tuple[list[int], list[MultiModalItem]]:
        """Token ids with each image's placeholders expanded, and the items that fill them."""
        if not refs:
            return token_ids, []
        self.check_count(refs)
        from streamvlm.inputs.images import read_image

        # Headers first: the token count each image will take is known from its size, so a request
        # that cannot fit the context is refused before any pixels are decoded.
        pending = iter(await asyncio.gather(*(read_image(ref.value, self.limits)
                                              for ref in refs if ref.source == "pixels")))
        slots: list[PendingImage | MultiModalItem] = [next(pending) if ref.source == "pixels" else self._embeds_item(ref)
                            for ref in refs]
        self._check_context(token_ids, [self._num_tokens(slot) for slot in slots])
        decoded = iter(await asyncio.gather(*(self._pixels_item(slot) for slot in slots
                                              if not isinstance(slot, MultiModalItem))))
        items = [slot if isinstance(slot, MultiModalItem) else next(decoded) for slot in slots]
        return self._expand(token_ids, items)

    def _num_tokens(self, slot: PendingImage | MultiModalItem) -> int:
        if isinstance(slot, MultiModalItem):
            return slot.num_tokens
        from streamvlm.inputs.images import fitted_size

        width, height = fitted_size(slot.size, self.limits.max_image_size)
        return self.image_processor.num_tokens_for_size(width, height)

    def _check_context(self, token_ids: list[int], image_tokens: list[int]) -> None:
        """The prompt's length once its placeholders are expanded, checked as validate() will."""
        placeholders = sum(1 for t in token_ids if t == self.image_token_id)
        if placeholders != len(image_tokens):
            return  # expanded already, or a mismatch that _expand names
        total = len(token_ids) - placeholders + sum(image_tokens)
        if total >= self.max_model_len:
            raise ValueError(f"prompt has {total} tokens ({sum(image_tokens)} of them for "
                             f"{len(image_tokens)} images); max_model_len={self.max_model_len} "
                             f"leaves no room to generate")

    async def _pixels_item(self, pending: PendingImage) -> MultiModalItem:
        """Decodes and preprocesses one image in a worker thread, once its pixels fit the budget."""
        granted = await self.pixel_budget.acquire(pending.num_pixels)
        work = asyncio.get_running_loop().run_in_executor(self._executor, self._decode_and_preprocess, pending)
        # Released when the thread is done, even if the request is cancelled while it runs.
        work.add_done_callback(lambda _: self.pixel_budget.release(granted))
        return await asyncio.shield(work)

    def _decode_and_preprocess(self, pending: PendingImage) -> MultiModalItem:
        """Decoded and resized here; the worker rescales, normalizes and lays out the uint8 pixels on its
        device (a quarter of the bytes of float32 pixel values to send, and no float work here)."""
        from streamvlm.inputs.images import decode_pending_image

        loaded = decode_pending_image(pending, self.limits)
        resized = self.image_processor.resized(loaded.image)
        grid = list(resized.grid_thw) if resized.grid_thw is not None else None
        pixels = resized.pixels
        return MultiModalItem(hash=loaded.hash, offset=-1, num_tokens=resized.num_tokens,
                              data=TensorData("uint8", list(pixels.shape), pixels.tobytes()),
                              source="image_uint8", grid_thw=grid,
                              pixel_steps=self.image_processor.pixel_steps)

    def _embeds_item(self, ref: ImageRef) -> MultiModalItem:
        data = tensor_data(ref.value)
        if len(data.shape) != 2 or data.shape[0] < 1:
            raise ValueError(f"image {ref.source} must be a 2-D array [rows, width], got shape "
                             f"{data.shape}")
        if self.needs_grid and ref.grid_thw is None:
            raise ValueError(f"image {ref.source} for {self.architecture} needs image_grid_thw")
        rows = data.shape[0]
        if ref.source == "features":
            if rows % (self.merge_size ** 2):
                raise ValueError(f"image_features has {rows} rows, not a multiple of "
                                 f"spatial_merge_size**2 = {self.merge_size ** 2}")
            num_tokens = rows // self.merge_size ** 2
        else:
            num_tokens = rows
        if ref.grid_thw is not None:
            t, h, w = ref.grid_thw
            if t * h * w // self.merge_size ** 2 != num_tokens:
                raise ValueError(f"image_grid_thw {ref.grid_thw} gives {t * h * w // self.merge_size ** 2}"
                                 f" tokens but the {ref.source} have {num_tokens}")
        return MultiModalItem(hash=content_hash(ref.source, data.dtype, str(data.shape), data.data),
                              offset=-1, num_tokens=num_tokens, data=data, source=ref.source,
                              grid_thw=ref.grid_thw)

    def _expand(self, token_ids: list[int], items: list[MultiModalItem]
                ) -> tuple[list[int], list[MultiModalItem]]:
        """One placeholder token per image expands to the image's token count; a prompt whose
        placeholders are already expanded (token ids from elsewhere) is taken as it is."""
        token = self.image_token_id
        positions = [i for i, t in enumerate(token_ids) if t == token]
        if len(positions) == len(items):
            out: list[int] = []
            previous = 0
            for position, item in zip(positions, items):
                out.extend(token_ids[previous:position])
                item.offset = len(out)
                out.extend([token] * item.num_tokens)
                previous = position + 1
            out.extend(token_ids[previous:])
            return out, items
        if len(positions) == sum(item.num_tokens for item in items):
            cursor = 0
            for item in items:
                run = positions[cursor:cursor + item.num_tokens]
                if run[-1] - run[0] != item.num_tokens - 1:
                    raise ValueError("the prompt's expanded image placeholders do not match the "
                                     "images' token counts")
                item.offset = run[0]
                cursor += item.num_tokens
            return token_ids, items
        raise ValueError(f"the prompt has {len(positions)} image placeholder tokens for "
                         f"{len(items)} images")
