"""Image preprocessing against transformers' PIL image processors, which read the same preprocessor config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
)

from streamvlm.inputs.image_processing import (
    LlavaImageProcessor,
    ProcessedImage,
    QwenVLImageProcessor,
    image_processor_for,
)

# (height, width): tiny ones that need upscaling, tall, wide, odd, and large ones that need downscaling.
IMAGE_SIZES = [(1, 1), (5, 7), (28, 28), (30, 300), (300, 30), (2, 350), (97, 131), (400, 600), (1000, 10)]
ATOL = 1e-6

QWEN2_5_VL_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vision_config": {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
QWEN3_VL_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "vision_config": {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
TEXT_ONLY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def llava_config(tower: str, image_size: int, patch_size: int, **extra) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": {"model_type": tower, "image_size": image_size, "patch_size": patch_size},
        **extra,
    }


def saved_config(processor, tmp_path: Path) -> dict:
    """What a checkpoint folder holds: the processor's preprocessor_config.json."""
    processor.save_pretrained(tmp_path)
    return json.loads((tmp_path / "preprocessor_config.json").read_text())


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed + 1000 * height + width)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


# ---------------------------------------------------------------------------------------------------------------------
# Qwen-VL


def qwen2_5_vl_preprocessor(tmp_path: Path) -> dict:
    # Qwen2.5-VL checkpoints carry top-level min_pixels/max_pixels rather than size.
    config = saved_config(Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2), tmp_path)
    del config["size"]
    return {**config, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64}


def qwen3_vl_preprocessor(tmp_path: Path) -> dict:
    processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 40},
    )
    return saved_config(processor, tmp_path)


QWEN_CASES = {
    "qwen2_5_vl": (QWEN2_5_VL_CONFIG, qwen2_5_vl_preprocessor),
    "qwen3_vl": (QWEN3_VL_CONFIG, qwen3_vl_preprocessor),
}


def assert_matches_qwen_reference(ours: ProcessedImage, reference, merge_size: int) -> None:
    expected = np.asarray(reference["pixel_values"])
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == expected.shape
    np.testing.assert_allclose(ours.pixel_values, expected, rtol=0, atol=ATOL)
    assert [list(ours.grid_thw)] == reference["image_grid_thw"].tolist()
    # Qwen2VLProcessor / Qwen3VLProcessor expand each image to prod(grid_thw) // merge_size**2 tokens.
    assert ours.num_tokens == int(reference["image_grid_thw"][0].prod()) // merge_size**2


@pytest.mark.parametrize("family", sorted(QWEN_CASES))
def test_qwen_vl_matches_transformers(family: str, tmp_path: Path) -> None:
    hf_config, make_preprocessor = QWEN_CASES[family]
    preprocessor = make_preprocessor(tmp_path)
    reference = Qwen2VLImageProcessorPil.from_dict(preprocessor)
    ours = image_processor_for(hf_config, preprocessor)
    assert isinstance(ours, QwenVLImageProcessor)
    for height, width in IMAGE_SIZES:
        image = random_image(height, width)
        assert_matches_qwen_reference(ours.preprocess(image), reference(image), reference.merge_size)


def test_qwen_vl_settings_as_read(tmp_path: Path) -> None:
    qwen2_5 = image_processor_for(QWEN2_5_VL_CONFIG, qwen2_5_vl_preprocessor(tmp_path))
    assert (qwen2_5.patch_size, qwen2_5.merge_size, qwen2_5.temporal_patch_size) == (14, 2, 2)
    assert (qwen2_5.min_pixels, qwen2_5.max_pixels) == (56 * 56, 28 * 28 * 64)
    qwen3 = image_processor_for(QWEN3_VL_CONFIG, qwen3_vl_preprocessor(tmp_path))
    assert (qwen3.patch_size, qwen3.min_pixels, qwen3.max_pixels) == (16, 32 * 32 * 2, 32 * 32 * 40)
    assert qwen3.scaling.mean == (0.5, 0.5, 0.5)
    processed = qwen3.preprocess(random_image(64, 96))
    assert processed.pixel_values.shape == (4 * 6, 3 * 2 * 16 * 16)
    assert processed.grid_thw == (1, 4, 6) and processed.num_tokens == 6


def test_qwen_vl_top_level_pixels_override_size(tmp_path: Path) -> None:
    preprocessor = {**qwen3_vl_preprocessor(tmp_path), "min_pixels": 64 * 64, "max_pixels": 32 * 32 * 8}
    reference = Qwen2VLImageProcessorPil.from_dict(preprocessor)
    ours = image_processor_for(QWEN3_VL_CONFIG, preprocessor)
    assert (ours.min_pixels, ours.max_pixels) == (64 * 64, 32 * 32 * 8)
    for height, width in [(10, 10), (500, 300)]:
        image = random_image(height, width)
        assert_matches_qwen_reference(ours.preprocess(image), reference(image), 2)


def test_qwen_vl_without_rescale_or_normalize(tmp_path: Path) -> None:
    for flags in ({"do_rescale": False}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False}):
        preprocessor = {**qwen3_vl_preprocessor(tmp_path), **flags}
        reference = Qwen2VLImageProcessorPil.from_dict(preprocessor)
        image = random_image(50, 70)
        ours = image_processor_for(QWEN3_VL_CONFIG, preprocessor).preprocess(image)
        assert_matches_qwen_reference(ours, reference(image), 2)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "RGB"])
def test_transparency_and_modes_converted_like_transformers(mode: str, tmp_path: Path) -> None:
    preprocessor = qwen3_vl_preprocessor(tmp_path)
    reference = Qwen2VLImageProcessorPil.from_dict(preprocessor)
    ours = image_processor_for(QWEN3_VL_CONFIG, preprocessor)
    image = random_image(40, 70, mode=mode)
    # Transparent colour keys (as PNG's tRNS gives) composite onto white too.
    if mode == "P":
        image.info["transparency"] = 7
    if mode == "RGB":
        image.info["transparency"] = image.getpixel((3, 5))
    assert_matches_qwen_reference(ours.preprocess(image), reference(image), 2)


def test_qwen_vl_absurd_aspect_ratio(tmp_path: Path) -> None:
    preprocessor = qwen3_vl_preprocessor(tmp_path)
    ours = image_processor_for(QWEN3_VL_CONFIG, preprocessor)
    image = random_image(1, 300)
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessorPil.from_dict(preprocessor)(image)
    with pytest.raises(ValueError, match="aspect ratio of 300.0; Qwen-VL accepts at most 200"):
        ours.preprocess(image)


def test_empty_image_refused(tmp_path: Path) -> None:
    # transformers 5.x upscales any non-empty image (1x1 included, see IMAGE_SIZES) and fails only on an empty one,
    # with a ZeroDivisionError; we say why.
    preprocessor = qwen3_vl_preprocessor(tmp_path)
    empty = Image.new("RGB", (0, 5))
    with pytest.raises(ZeroDivisionError):
        Qwen2VLImageProcessorPil.from_dict(preprocessor)(empty)
    with pytest.raises(ValueError, match="image is empty"):
        image_processor_for(QWEN3_VL_CONFIG, preprocessor).preprocess(empty)
    clip = image_processor_for(llava_config("clip_vision_model", 28, 14), {"crop_size": 28, "size": 30})
    with pytest.raises(ValueError, match="image is empty"):
        clip.preprocess(empty)


def test_qwen_vl_without_resize_needs_whole_windows(tmp_path: Path) -> None:
    preprocessor = {**qwen3_vl_preprocessor(tmp_path), "do_resize": False}
    ours = image_processor_for(QWEN3_VL_CONFIG, preprocessor)
    image = random_image(64, 96)
    assert_matches_qwen_reference(ours.preprocess(image), Qwen2VLImageProcessorPil.from_dict(preprocessor)(image), 2)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        ours.preprocess(random_image(64, 90))


def test_qwen_vl_num_tokens_for_embeds(tmp_path: Path) -> None:
    ours = image_processor_for(QWEN2_5_VL_CONFIG, qwen2_5_vl_preprocessor(tmp_path))
    assert ours.num_tokens_for_embeds(6, (1, 4, 6)) == 6
    assert ours.num_tokens_for_embeds(6, [1, 4, 6]) == 6
    with pytest.raises(ValueError, match="makes 6 image tokens"):
        ours.num_tokens_for_embeds(7, (1, 4, 6))
    with pytest.raises(ValueError, match="multiples of the merge size"):
        ours.num_tokens_for_embeds(3, (1, 3, 4))
    with pytest.raises(ValueError, match="need their grid_thw"):
        ours.num_tokens_for_embeds(6, None)
    with pytest.raises(ValueError, match="three positive integers"):
        ours.num_tokens_for_embeds(6, (4, 6))
    with pytest.raises(ValueError, match="at least one row"):
        ours.num_tokens_for_embeds(0, (1, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<image>": 1, "look": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # As a special token "<image>" splits out of the "<image><image>..." run the processor writes.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}
    )


def llava_expansion(image_processor, image: Image.Image, patch_size: int, strategy: str, has_cls: bool) -> int:
    """How many <image> tokens transformers' LlavaProcessor writes for one image."""
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=word_level_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=int(has_cls),
    )
    return processor(text="look <image>", images=image)["input_ids"][0].count(1)


LLAVA_CASES = {
    # name: (reference processor, tower model_type, tower image_size, tower patch_size, strategy)
    "clip_default": (
        CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28}),
        "clip_vision_model", 28, 14, "default",
    ),
    "clip_full": (
        CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}),
        "clip_vision_model", 42, 14, "full",
    ),
    # A shortest edge below the crop: the crop zero-pads.
    "clip_crop_pads": (
        CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 28, "width": 28}),
        "clip_vision_model", 28, 14, "default",
    ),
    "siglip_full": (SiglipImageProcessorPil(size={"height": 32, "width": 32}), "siglip_vision_model", 32, 16, "full"),
    "siglip_default": (
        SiglipImageProcessorPil(size={"height": 48, "width": 48}, resample=2), "siglip_vision_model", 48, 16, "default",
    ),
    "llava_pad_to_square": (
        LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28}),
        "clip_vision_model", 28, 14, "default",
    ),
}


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_llava_matches_transformers(case: str, tmp_path: Path) -> None:
    reference, tower, image_size, patch_size, strategy = LLAVA_CASES[case]
    preprocessor = saved_config(reference, tmp_path)
    hf_config = llava_config(tower, image_size, patch_size, vision_feature_select_strategy=strategy)
    ours = image_processor_for(hf_config, preprocessor)
    assert isinstance(ours, LlavaImageProcessor)
    for height, width in IMAGE_SIZES:
        image = random_image(height, width)
        processed = ours.preprocess(image)
        expected = reference(image, return_tensors="np")["pixel_values"][0]
        assert processed.pixel_values.dtype == np.float32
        assert processed.pixel_values.shape == expected.shape == (3, image_size, image_size)
        np.testing.assert_allclose(processed.pixel_values, expected, rtol=0, atol=ATOL)
        assert processed.grid_thw is None
    has_cls = tower == "clip_vision_model"
    expanded = llava_expansion(reference, random_image(40, 50), patch_size, strategy, has_cls)
    assert processed.num_tokens == expanded


def test_llava_token_counts() -> None:
    clip_default = image_processor_for(llava_config("clip_vision_model", 336, 14), {"crop_size": 336, "size": 336})
    assert clip_default.num_tokens == 576
    clip_full = image_processor_for(
        llava_config("clip_vision_model", 336, 14, vision_feature_select_strategy="full"),
        {"crop_size": 336, "size": 336},
    )
    assert clip_full.num_tokens == 577
    siglip = image_processor_for(
        llava_config("siglip_vision_model", 384, 14, vision_feature_select_strategy="full", image_seq_length=729),
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}},
    )
    assert siglip.num_tokens == 729
    # Without vision_config, LlavaConfig's CLIP tower (336 px, patch 14) and default strategy.
    default = image_processor_for({"model_type": "llava"}, {"crop_size": 336, "size": 336})
    assert default.num_tokens == 576 and default.tower.model_type == "clip_vision_model"


def test_llava_processor_chosen_by_tower_when_type_missing(tmp_path: Path) -> None:
    preprocessor = saved_config(SiglipImageProcessorPil(size={"height": 32, "width": 32}), tmp_path)
    del preprocessor["image_processor_type"]
    ours = image_processor_for(llava_config("siglip_vision_model", 32, 16), preprocessor)
    assert ours.crop_size is None and ours.resize_rule.fixed_size == (32, 32)
    image = random_image(20, 70)
    expected = SiglipImageProcessorPil.from_dict(preprocessor)(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours.preprocess(image).pixel_values, expected, rtol=0, atol=ATOL)


def test_llava_num_tokens_for_embeds() -> None:
    ours = image_processor_for(llava_config("clip_vision_model", 28, 14), {"crop_size": 28, "size": 30})
    assert ours.num_tokens_for_embeds(5, None) == 5
    with pytest.raises(ValueError, match="Qwen-VL models only"):
        ours.num_tokens_for_embeds(4, (1, 2, 2))
    with pytest.raises(ValueError, match="at least one row"):
        ours.num_tokens_for_embeds(0, None)


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def test_nested_processor_config_and_model_type_only(tmp_path: Path) -> None:
    preprocessor = qwen3_vl_preprocessor(tmp_path)
    hf_config = {key: value for key, value in QWEN3_VL_CONFIG.items() if key != "architectures"}
    ours = image_processor_for(hf_config, {"image_processor": preprocessor, "processor_class": "Qwen3VLProcessor"})
    assert ours.patch_size == 16 and ours.min_pixels == 32 * 32 * 2


def test_text_only_config_refused() -> None:
    with pytest.raises(ValueError, match="LlamaForCausalLM has no image support"):
        image_processor_for(TEXT_ONLY_CONFIG, {})


@pytest.mark.parametrize(
    ("hf_config", "preprocessor", "message"),
    [
        (QWEN3_VL_CONFIG, {"patch_size": 16, "size": {"shortest_edge": 1024}}, "shortest_edge and longest_edge"),
        (QWEN3_VL_CONFIG, {"patch_size": 16, "size": {"bogus": 3}}, "size keys must be one of"),
        (QWEN3_VL_CONFIG, {"patch_size": 14}, "vision config's patch_size is 16"),
        (QWEN3_VL_CONFIG, {"patch_size": 16, "image_mean": [0.5, 0.5]}, "image_mean must be"),
        (QWEN3_VL_CONFIG, {"patch_size": 16, "image_std": [0.5, 0, 0.5]}, "must not contain zeros"),
        (QWEN3_VL_CONFIG, {"patch_size": 16, "resample": 9}, "Pillow filter"),
        (QWEN3_VL_CONFIG, {"patch_size": 16, "image_processor_type": "CLIPImageProcessor"}, "not one of"),
        (QWEN3_VL_CONFIG, {"patch_size": 16, "do_resize": "yes"}, "do_resize must be true or false"),
        (llava_config("clip_vision_model", 28, 14), {"crop_size": 32, "size": 32}, "vision tower takes 28x28"),
        (llava_config("pixtral", 28, 14), {}, "vision tower 'pixtral' is not supported"),
        (llava_config("clip_vision_model", 28, 14), {"image_processor_type": "PixtralImageProcessor"}, "not supported"),
        (llava_config("clip_vision_model", 28, 14, vision_feature_select_strategy="cls"), {}, "'default' or 'full'"),
    ],
)
def test_unusable_configs_refused(hf_config: dict, preprocessor: dict, message: str) -> None:
    architecture = hf_config["architectures"][0]
    with pytest.raises(ValueError, match=f"{architecture}: unusable preprocessor config") as raised:
        image_processor_for(hf_config, preprocessor)
    assert message in str(raised.value)


def test_engine_core_stays_torch_free() -> None:
    code = (
        "import sys, streamvlm.inputs.image_processing; "
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
