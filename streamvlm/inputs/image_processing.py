"""Image preprocessing for the vision encoders the engine serves, without torch: numpy and Pillow only.

One decoded PIL image becomes the ``pixel_values`` a model family's vision encoder expects, with the
number of placeholder tokens it expands to in the prompt. Settings come from the checkpoint's
``preprocessor_config.json`` and the model's ``config.json`` (both as dicts), read the way transformers
reads them, and the arithmetic follows transformers' PIL image processors step for step (same Pillow
filters, same float dtypes in the same order), so the results agree with theirs exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from PIL import Image

from streamvlm.contract.families import ImageProcessorKind, architecture_of, family_of
from streamvlm.contract.protocol import PixelSteps, TensorData

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
DEFAULT_RESCALE_FACTOR = 1 / 255
NUM_CHANNELS = 3
# Qwen-VL refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200

# The size-dict key sets transformers accepts (get_size_dict); anything else is refused.
VALID_SIZE_KEY_SETS = (
    frozenset({"height", "width"}),
    frozenset({"shortest_edge"}),
    frozenset({"shortest_edge", "longest_edge"}),
    frozenset({"longest_edge"}),
    frozenset({"max_height", "max_width"}),
    frozenset({"min_pixels", "max_pixels"}),
)
PIL_RESAMPLE_FILTERS = frozenset(int(f) for f in Image.Resampling)


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    # float32, the layout transformers' processor gives for ONE image: [3, H, W] for LLaVA,
    # [grid_t * grid_h * grid_w, C * temporal_patch * patch * patch] for Qwen-VL.
    pixel_values: np.ndarray
    # Placeholder tokens the image expands to in the prompt.
    num_tokens: int
    # Qwen-VL families: (t, h, w) in patches.
    grid_thw: tuple[int, int, int] | None = None


@dataclass(frozen=True, eq=False)
class ResizedImage:
    """An image resized (and cropped) for the vision tower, before rescale and normalization: what crosses to the
    worker, which finishes it with the processor's ``pixel_steps``."""

    pixels: np.ndarray   # uint8 [H, W, 3]
    num_tokens: int
    grid_thw: tuple[int, int, int] | None = None


class ImageProcessor(Protocol):
    def preprocess(self, image: Image.Image) -> ProcessedImage: ...

    def resized(self, image: Image.Image) -> ResizedImage:
        """The part of ``preprocess`` that needs Pillow: ``pixel_steps`` applied to its pixels give ``preprocess``."""
        ...

    @property
    def pixel_steps(self) -> PixelSteps: ...

    def num_tokens_for_size(self, width: int, height: int) -> int:
        """Placeholder tokens ``preprocess`` gives an image of this size, known before it is decoded."""
        ...

    def num_tokens_for_embeds(self, num_rows: int, grid_thw: Sequence[int] | None) -> int:
        """Placeholder tokens for precomputed image embeddings of ``num_rows`` rows (already in the LM hidden size);
        raises ValueError when ``grid_thw`` does not fit the model family or the rows."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Pixel steps shared by the families


@dataclass(frozen=True)
class PixelScaling:
    """Rescale then normalize, in transformers' precision: the rescale multiplies in float64 and casts to float32,
    the normalization subtracts and divides in float32."""

    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] -> float32 [H, W, C]."""
        values = pixels
        if self.do_rescale:
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        values = values.astype(np.float32, copy=False)
        if self.do_normalize:
            values = (values - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return values

    def value_table(self) -> TensorData:
        """``apply`` of every uint8 level in every channel, float32 [256, 3]: each output value depends only on its
        input value and channel, so looking values up in it gives ``apply``'s results exactly."""
        levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], NUM_CHANNELS, axis=1)
        table = np.ascontiguousarray(self.apply(levels), dtype=np.float32)
        return TensorData("float32", list(table.shape), table.tobytes())


def to_rgb(image: Image.Image, convert: bool) -> Image.Image:
    """transformers' do_convert_rgb: transparency (an alpha band or a transparent colour) is composited onto white;
    an RGB image with a transparent colour key is composited too."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is empty ({image.width}x{image.height} pixels)")
    if not convert:
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r} and the preprocessor config disables do_convert_rgb")
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize a {image.width}x{image.height} image to {width}x{height}")
    return image.resize((width, height), resample=resample)


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Crop [H, W, C] around the centre; where the image is smaller than the crop it is zero-padded first, with the
    same offsets transformers uses (they differ by one from a symmetric pad for odd differences)."""
    height, width = pixels.shape[:2]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop_height, left:left + crop_width]
    padded_height, padded_width = max(crop_height, height), max(crop_width, width)
    top_pad = math.ceil((padded_height - height) / 2)
    left_pad = math.ceil((padded_width - width) / 2)
    padded = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = pixels
    top += top_pad
    left += left_pad
    return padded[max(0, top):min(padded_height, top + crop_height), max(0, left):min(padded_width, left + crop_width)]


def pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's do_pad: centre the image on a square of its longest side filled with ``background``."""
    side = max(image.width, image.height)
    if image.width == image.height:
        return image
    square = Image.new("RGB", (side, side), background)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


# ---------------------------------------------------------------------------------------------------------------------
# Qwen-VL


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's target size: both sides multiples of ``factor``, the area within [min_pixels, max_pixels], the aspect
    ratio kept as closely as possible. The float expressions keep transformers' order so sizes match to the pixel."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {width}x{height} pixels has an aspect ratio of {max(height, width) / min(height, width):.1f}; "
            f"Qwen-VL accepts at most {MAX_ASPECT_RATIO}"
        )
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        resized_height = max(factor, math.floor(height / beta / factor) * factor)
        resized_width = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


@dataclass(frozen=True)
class QwenVLImageProcessor:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (transformers' Qwen2VLImageProcessor): a dynamic resolution cut into patches,
    listed merge window by merge window, each patch repeated over the temporal patch."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    do_resize: bool
    resample: int
    do_convert_rgb: bool
    scaling: PixelScaling

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        resized = self.resized(image)
        patches, _, _ = self._patchify(self.scaling.apply(resized.pixels))
        return ProcessedImage(pixel_values=patches, num_tokens=resized.num_tokens, grid_thw=resized.grid_thw)

    def resized(self, image: Image.Image) -> ResizedImage:
        image = to_rgb(image, self.do_convert_rgb)
        if self.do_resize:
            height, width = smart_resize(image.height, image.width, self.factor, self.min_pixels, self.max_pixels)
            image = resize(image, height, width, self.resample)
        elif image.height % self.factor or image.width % self.factor:
            raise ValueError(
                f"image of {image.width}x{image.height} pixels is not a multiple of {self.factor} on both sides, "
                "and the preprocessor config disables do_resize"
            )
        grid_thw = (1, image.height // self.patch_size, image.width // self.patch_size)
        return ResizedImage(pixels=np.asarray(image), num_tokens=self._tokens(grid_thw), grid_thw=grid_thw)

    @cached_property
    def pixel_steps(self) -> PixelSteps:
        return PixelSteps(self.scaling.value_table(), "qwen_patches", self.patch_size, self.merge_size,
                          self.temporal_patch_size)

    def num_tokens_for_size(self, width: int, height: int) -> int:
        if self.do_resize:
            height, width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return self._tokens((1, height // self.patch_size, width // self.patch_size))

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[H, W, C] -> [grid_h * grid_w, C * T * P * P], rows in (window row, window col, row in window, col in
        window) order, each row laid out (channel, time, patch row, patch col)."""
        height, width, channels = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        windows = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
        # -> (window row, window col, row in window, col in window, channel, patch row, patch col)
        windows = windows.transpose(0, 3, 1, 4, 6, 2, 5)
        # A still image is its own frame at every step of the temporal patch.
        windows = np.broadcast_to(windows[:, :, :, :, :, None], (*windows.shape[:5], t, p, p))
        patches = np.ascontiguousarray(windows.reshape(grid_h * grid_w, channels * t * p * p), dtype=np.float32)
        return patches, grid_h, grid_w

    def _tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // self.merge_size**2

    def num_tokens_for_embeds(self, num_rows: int, grid_thw: Sequence[int] | None) -> int:
        _check_num_rows(num_rows)
        if grid_thw is None:
            raise ValueError("Qwen-VL image embeddings need their grid_thw (t, h, w in patches) for the positions")
        thw = _grid_thw(grid_thw)
        if thw[1] % self.merge_size or thw[2] % self.merge_size:
            raise ValueError(f"grid_thw {list(thw)}: h and w must be multiples of the merge size {self.merge_size}")
        expected = self._tokens(thw)
        if expected != num_rows:
            raise ValueError(
                f"grid_thw {list(thw)} makes {expected} image tokens (t*h*w / {self.merge_size}**2) "
                f"but the embeddings have {num_rows} rows"
            )
        return num_rows

    @classmethod
    def from_configs(cls, hf_config: Mapping[str, Any], preprocessor: Mapping[str, Any]) -> QwenVLImageProcessor:
        _check_processor_type(preprocessor, {"Qwen2VLImageProcessor"})
        min_pixels, max_pixels = _qwen_pixel_bounds(preprocessor)
        processor = cls(
            patch_size=_positive_int(preprocessor, "patch_size", 14),
            merge_size=_positive_int(preprocessor, "merge_size", 2),
            temporal_patch_size=_positive_int(preprocessor, "temporal_patch_size", 2),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            do_resize=_flag(preprocessor, "do_resize", True),
            resample=_resample(preprocessor, int(Image.Resampling.BICUBIC)),
            do_convert_rgb=_flag(preprocessor, "do_convert_rgb", True),
            scaling=_scaling(preprocessor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        )
        vision = _sub_config(hf_config, "vision_config")
        # A processor whose patches the vision tower does not expect would fail (or silently misread) in the model.
        for model_key, value in (
            ("patch_size", processor.patch_size),
            ("spatial_merge_size", processor.merge_size),
            ("temporal_patch_size", processor.temporal_patch_size),
        ):
            if vision.get(model_key) is not None and vision[model_key] != value:
                raise ValueError(
                    f"preprocessor config gives {value} where the vision config's {model_key} is {vision[model_key]}"
                )
        return processor


def _qwen_pixel_bounds(preprocessor: Mapping[str, Any]) -> tuple[int, int]:
    """transformers 5.x: top-level min_pixels/max_pixels override size's shortest_edge/longest_edge (which count
    pixels, not edges, for Qwen-VL); without either, the class default size applies."""
    size = preprocessor.get("size")
    bounds = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280} if size is None else _size_dict(size, False)
    if preprocessor.get("min_pixels") is not None:
        bounds["shortest_edge"] = preprocessor["min_pixels"]
        bounds.pop("min_pixels", None)
    if preprocessor.get("max_pixels") is not None:
        bounds["longest_edge"] = preprocessor["max_pixels"]
        bounds.pop("max_pixels", None)
    if set(bounds) != {"shortest_edge", "longest_edge"}:
        raise ValueError(f"size needs shortest_edge and longest_edge (or min_pixels and max_pixels), got {bounds}")
    return _positive_int(bounds, "shortest_edge", None), _positive_int(bounds, "longest_edge", None)


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA (CLIP or SigLIP tower)


@dataclass(frozen=True)
class ResizeRule:
    """A transformers size dict for the PIL backend's resize; the first rule that applies wins, in its order."""

    height: int | None = None
    width: int | None = None
    shortest_edge: int | None = None
    longest_edge: int | None = None
    max_height: int | None = None
    max_width: int | None = None

    def __post_init__(self) -> None:
        if not (self.shortest_edge or (self.max_height and self.max_width) or (self.height and self.width)):
            raise ValueError(f"size must give height and width, max_height and max_width, or shortest_edge: {self}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.shortest_edge and self.longest_edge:
            return _size_with_aspect_ratio(height, width, self.shortest_edge, self.longest_edge)
        if self.shortest_edge:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if self.max_height and self.max_width:
            scale = min(self.max_height / height, self.max_width / width)
            return int(height * scale), int(width * scale)
        assert self.height and self.width
        return self.height, self.width

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        if self.shortest_edge or (self.max_height and self.max_width):
            return None
        assert self.height and self.width
        return self.height, self.width


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """Shortest edge to ``size`` unless that makes the longest edge exceed ``max_size`` (DETR-style)."""
    raw_size = None
    short_side, long_side = float(min(height, width)), float(max(height, width))
    if long_side / short_side * size > max_size:
        raw_size = max_size * short_side / long_side
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return int((raw_size if raw_size is not None else size) * height / width), size
    return size, int((raw_size if raw_size is not None else size) * width / height)


@dataclass(frozen=True)
class VisionTower:
    """What the LLaVA vision tower takes and gives: its square-or-not input size, its patch, whether it prepends a
    CLS token."""

    model_type: str
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    has_cls_token: bool


# model_type -> (default image_size, default patch_size, has a CLS token), from the towers' config classes.
VISION_TOWERS = {
    "clip_vision_model": (224, 32, True),
    "siglip_vision_model": (224, 16, False),
}
# LlavaConfig's vision tower when config.json has no vision_config at all.
LLAVA_DEFAULT_VISION_CONFIG = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14}
# image_processor_type -> (class defaults) for the processors LLaVA checkpoints ship.
LLAVA_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
        "do_pad": False, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
    },
    "LlavaImageProcessor": {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
        "do_pad": False, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
    },
    "SiglipImageProcessor": {
        "size": {"height": 224, "width": 224}, "crop_size": None, "do_center_crop": False,
        "do_pad": False, "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD,
    },
}
PROCESSOR_TYPE_BY_TOWER = {"clip_vision_model": "CLIPImageProcessor", "siglip_vision_model": "SiglipImageProcessor"}


@dataclass(frozen=True)
class LlavaImageProcessor:
    """LLaVA with a CLIP or SigLIP tower: resize (shortest edge or fixed), optional pad-to-square first and centre
    crop after, rescale, normalize; one [3, H, W] image at the tower's input size."""

    do_convert_rgb: bool
    # LlavaImageProcessor's do_pad: the fill colour of the square, None when off.
    square_background: tuple[int, int, int] | None
    resize_rule: ResizeRule | None
    resample: int
    crop_size: tuple[int, int] | None
    scaling: PixelScaling
    tower: VisionTower
    num_tokens: int

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every processed image, where the settings fix it."""
        if self.crop_size is not None:
            return self.crop_size
        return self.resize_rule.fixed_size if self.resize_rule is not None else None

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        resized = self.resized(image)
        pixel_values = np.ascontiguousarray(self.scaling.apply(resized.pixels).transpose(2, 0, 1), dtype=np.float32)
        return ProcessedImage(pixel_values=pixel_values, num_tokens=resized.num_tokens)

    def resized(self, image: Image.Image) -> ResizedImage:
        image = to_rgb(image, self.do_convert_rgb)
        if self.square_background is not None:
            image = pad_to_square(image, self.square_background)
        if self.resize_rule is not None:
            image = resize(image, *self.resize_rule.output_size(image.height, image.width), self.resample)
        pixels = np.asarray(image)
        if self.crop_size is not None:
            pixels = center_crop(pixels, *self.crop_size)
        if pixels.shape[:2] != self.tower.image_size:
            raise ValueError(
                f"processed image is {pixels.shape[1]}x{pixels.shape[0]} but the vision tower takes "
                f"{self.tower.image_size[1]}x{self.tower.image_size[0]}"
            )
        return ResizedImage(pixels=np.ascontiguousarray(pixels), num_tokens=self.num_tokens)

    @cached_property
    def pixel_steps(self) -> PixelSteps:
        return PixelSteps(self.scaling.value_table(), "channels_first")

    def num_tokens_for_size(self, width: int, height: int) -> int:
        return self.num_tokens

    def num_tokens_for_embeds(self, num_rows: int, grid_thw: Sequence[int] | None) -> int:
        _check_num_rows(num_rows)
        if grid_thw is not None:
            raise ValueError("grid_thw applies to Qwen-VL models only; LLaVA image embeddings take none")
        return num_rows

    @classmethod
    def from_configs(cls, hf_config: Mapping[str, Any], preprocessor: Mapping[str, Any]) -> LlavaImageProcessor:
        tower = _llava_vision_tower(hf_config)
        processor_type = _processor_type(preprocessor) or PROCESSOR_TYPE_BY_TOWER[tower.model_type]
        if processor_type not in LLAVA_PROCESSOR_DEFAULTS:
            raise ValueError(
                f"image_processor_type {processor_type!r} is not supported for LLaVA "
                f"(supported: {', '.join(sorted(LLAVA_PROCESSOR_DEFAULTS))})"
            )
        defaults = LLAVA_PROCESSOR_DEFAULTS[processor_type]
        default_to_square = _flag(preprocessor, "default_to_square", False)
        scaling = _scaling(preprocessor, defaults["image_mean"], defaults["image_std"])

        resize_rule = None
        if _flag(preprocessor, "do_resize", True):
            size = preprocessor.get("size")
            size_dict = _size_dict(defaults["size"] if size is None else size, default_to_square)
            if "min_pixels" in size_dict:
                raise ValueError(f"size in pixels ({size_dict}) is for dynamic resolution, not {processor_type}")
            resize_rule = ResizeRule(**size_dict)
        crop_size = None
        if _flag(preprocessor, "do_center_crop", defaults["do_center_crop"]):
            crop = preprocessor.get("crop_size")
            crop_dict = _size_dict(defaults["crop_size"] if crop is None else crop, True)
            if set(crop_dict) != {"height", "width"}:
                raise ValueError(f"crop_size needs height and width, got {crop_dict}")
            crop_size = (_positive_int(crop_dict, "height", None), _positive_int(crop_dict, "width", None))

        square_background = None
        if _flag(preprocessor, "do_pad", defaults["do_pad"]):
            if processor_type != "LlavaImageProcessor":
                # The generic do_pad only pads a batch to its largest image, a no-op for one image, unless a pad_size
                # asks for more.
                if preprocessor.get("pad_size") is not None:
                    raise ValueError(f"{processor_type} with do_pad and a pad_size is not supported")
            else:
                red, green, blue = (int(x * 255) for x in scaling.mean)
                square_background = (red, green, blue)

        strategy = hf_config.get("vision_feature_select_strategy") or "default"
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        (height, width), (patch_h, patch_w) = tower.image_size, tower.patch_size
        # "default" drops the first output position (the CLS token, for towers that have one).
        num_tokens = (height // patch_h) * (width // patch_w) + int(tower.has_cls_token) - int(strategy == "default")
        # image_seq_length in a LLaVA config is a default that transformers never checks against the tower
        # (it keeps 576 for any tower): the tower's geometry decides, as in LlavaProcessor.
        processor = cls(
            do_convert_rgb=_flag(preprocessor, "do_convert_rgb", True),
            square_background=square_background,
            resize_rule=resize_rule,
            resample=_resample(preprocessor, int(Image.Resampling.BICUBIC)),
            crop_size=crop_size,
            scaling=scaling,
            tower=tower,
            num_tokens=num_tokens,
        )
        if processor.output_size is not None and processor.output_size != tower.image_size:
            raise ValueError(
                f"preprocessor config makes {processor.output_size[1]}x{processor.output_size[0]} images but the "
                f"vision tower takes {width}x{height}"
            )
        return processor


def _llava_vision_tower(hf_config: Mapping[str, Any]) -> VisionTower:
    vision = hf_config.get("vision_config")
    if vision is None:
        vision = LLAVA_DEFAULT_VISION_CONFIG
    if not isinstance(vision, Mapping):
        raise ValueError(f"vision_config must be a dict, got {type(vision).__name__}")
    model_type = vision.get("model_type") or "clip_vision_model"
    if model_type not in VISION_TOWERS:
        raise ValueError(
            f"vision tower {model_type!r} is not supported (supported: {', '.join(sorted(VISION_TOWERS))})"
        )
    default_image_size, default_patch_size, has_cls_token = VISION_TOWERS[model_type]
    return VisionTower(
        model_type=model_type,
        image_size=_int_pair(vision, "image_size", default_image_size),
        patch_size=_int_pair(vision, "patch_size", default_patch_size),
        has_cls_token=has_cls_token,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Entry point

IMAGE_PROCESSORS: dict[ImageProcessorKind, type[QwenVLImageProcessor] | type[LlavaImageProcessor]] = {
    "qwen_vl": QwenVLImageProcessor,
    "llava": LlavaImageProcessor,
}


def image_processor_for(hf_config: dict, preprocessor_config: dict) -> ImageProcessor:
    """The image processor for a checkpoint, from its config.json and preprocessor_config.json (or the
    processor_config.json that nests it under "image_processor")."""
    architecture = architecture_of(hf_config)
    family = family_of(hf_config)
    kind = family.image_processor if family is not None else None
    if kind is None:
        raise ValueError(f"{architecture} has no image support")
    build = IMAGE_PROCESSORS[kind].from_configs
    if not isinstance(preprocessor_config, Mapping):
        raise ValueError(f"{architecture}: the preprocessor config must be a dict, got {type(preprocessor_config)}")
    nested = preprocessor_config.get("image_processor")
    preprocessor = nested if isinstance(nested, Mapping) else preprocessor_config
    try:
        return build(hf_config, preprocessor)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{architecture}: unusable preprocessor config: {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Reading configs the way transformers does: a missing or null key takes the processor class's default.


def _processor_type(preprocessor: Mapping[str, Any]) -> str | None:
    name = preprocessor.get("image_processor_type")
    if name is None:
        return None
    for suffix in ("Fast", "Pil"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return str(name)


def _check_processor_type(preprocessor: Mapping[str, Any], expected: set[str]) -> None:
    name = _processor_type(preprocessor)
    if name is not None and name not in expected:
        raise ValueError(f"image_processor_type {name!r} is not one of {sorted(expected)}")


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _positive_int(config: Mapping[str, Any], key: str, default: int | None) -> int:
    value = config.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _int_pair(config: Mapping[str, Any], key: str, default: int) -> tuple[int, int]:
    value = config.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{key} must be an integer or a pair, got {value!r}")
        return _positive_int({key: value[0]}, key, None), _positive_int({key: value[1]}, key, None)
    side = _positive_int(config, key, default)
    return side, side


def _resample(config: Mapping[str, Any], default: int) -> int:
    value = config.get("resample")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in PIL_RESAMPLE_FILTERS:
        raise ValueError(f"resample must be a Pillow filter number {sorted(PIL_RESAMPLE_FILTERS)}, got {value!r}")
    return int(value)


def _channel_values(config: Mapping[str, Any], key: str, default: tuple[float, float, float]) -> tuple[float, ...]:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * NUM_CHANNELS
    if not isinstance(value, (list, tuple)) or len(value) != NUM_CHANNELS:
        raise ValueError(f"{key} must be a number or {NUM_CHANNELS} numbers, got {value!r}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
        raise ValueError(f"{key} must hold numbers, got {value!r}")
    return tuple(float(x) for x in value)


def _scaling(
    config: Mapping[str, Any], default_mean: tuple[float, float, float], default_std: tuple[float, float, float]
) -> PixelScaling:
    rescale_factor = config.get("rescale_factor")
    if rescale_factor is None:
        rescale_factor = DEFAULT_RESCALE_FACTOR
    if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)) or rescale_factor <= 0:
        raise ValueError(f"rescale_factor must be a positive number, got {rescale_factor!r}")
    mean = _channel_values(config, "image_mean", default_mean)
    std = _channel_values(config, "image_std", default_std)
    if any(s == 0 for s in std):
        raise ValueError(f"image_std must not contain zeros, got {std}")
    return PixelScaling(
        do_rescale=_flag(config, "do_rescale", True),
        rescale_factor=float(rescale_factor),
        do_normalize=_flag(config, "do_normalize", True),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


def _size_dict(size: Any, default_to_square: bool) -> dict[str, int]:
    """transformers' get_size_dict: an int is a square (default_to_square) or a shortest edge, a pair is
    (height, width), a dict must use one of the known key sets."""
    if isinstance(size, bool):
        raise ValueError(f"size must be an integer, a pair or a dict, got {size!r}")
    if isinstance(size, (int, np.integer)):
        size_dict = {"height": int(size), "width": int(size)} if default_to_square else {"shortest_edge": int(size)}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size_dict = {"height": size[0], "width": size[1]}
    elif isinstance(size, Mapping):
        size_dict = {key: value for key, value in size.items() if value is not None}
    else:
        raise ValueError(f"size must be an integer, a pair or a dict, got {size!r}")
    if frozenset(size_dict) not in VALID_SIZE_KEY_SETS:
        raise ValueError(f"size keys must be one of {[sorted(keys) for keys in VALID_SIZE_KEY_SETS]}, got {size_dict}")
    return {key: _positive_int(size_dict, key, None) for key in size_dict}


def _sub_config(hf_config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = hf_config.get(key)
    return value if isinstance(value, Mapping) else {}


def _grid_thw(grid_thw: Sequence[int]) -> tuple[int, int, int]:
    values = list(grid_thw)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ValueError(f"grid_thw must be three positive integers (t, h, w), got {grid_thw!r}")
    return int(values[0]), int(values[1]), int(values[2])


def _check_num_rows(num_rows: int) -> None:
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"image embeddings must have at least one row, got {num_rows!r}")
