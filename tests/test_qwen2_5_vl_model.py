"""Qwen2.5-VL in plain PyTorch against transformers: vision tower, M-RoPE positions, logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint
from tests.model_harness import load_ours, prefill_logits
from workers.loader import iter_safetensors
from workers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from workers.multimodal import MultiModalEmbeds, MultiModalInput

IMAGE_SIZES = [(64, 48), (40, 56)]   # (width, height): grids of 12 x 16 and 14 x 10 patches


def load_vlm(path: Path) -> Qwen2_5_VLForConditionalGeneration:
    model = load_ours(path)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration as Reference

    return Reference.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(checkpoint) -> Qwen2_5_VLForConditionalGeneration:
    return load_vlm(checkpoint)


@pytest.fixture(scope="module")
def images(checkpoint) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
    """(pixel_values, grid_thw) of each test image, from the checkpoint's image processor."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    out = []
    for width, height in IMAGE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        batch = processor(images=[image], return_tensors="pt")
        out.append((batch["pixel_values"], tuple(batch["image_grid_thw"][0].tolist())))
    return out


def num_tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4


def build_prompt(model, grids: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat-like prompt with an image placeholder run per grid, and the offsets."""
    vision_start, vision_end = model.image_token_id - 2, model.image_token_id - 1
    ids, offsets = [1, 40, 41, 42, 10], []
    for i, grid in enumerate(grids):
        ids.append(vision_start)
        offsets.append(len(ids))
        ids += [model.image_token_id] * num_tokens(grid) + [vision_end] + [50 + i, 60 + i, 70]
    return ids + [2, 10, 1, 80, 81, 10], offsets


def pixel_items(images, offsets: list[int]) -> list[MultiModalInput]:
    return [MultiModalInput(f"img{i}", offset, num_tokens(grid), "pixels", "image", pixels, grid)
            for i, ((pixels, grid), offset) in enumerate(zip(images, offsets, strict=True))]


def reference_logits(hf, ids: list[int], images) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    kwargs = {}
    if images:
        kwargs = dict(pixel_values=torch.cat([pixels for pixels, _ in images]),
                      image_grid_thw=torch.tensor([grid for _, grid in images]),
                      mm_token_type_ids=(input_ids == hf.config.image_token_id).int())
    with torch.no_grad():
        return hf(input_ids=input_ids, **kwargs).logits[0]


@torch.inference_mode()
def our_logits(model, ids: list[int], items: list[MultiModalInput]) -> torch.Tensor:
    positions, _ = model.mrope_positions(ids, items)
    mm = None
    if items:
        rows = torch.cat([torch.arange(item.offset, item.end) for item in items])
        mm = MultiModalEmbeds(rows, torch.cat(model.encode(items)))
    return prefill_logits(model, ids, positions, mm)


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max() / reference.abs().max()
    assert error < 1e-4, f"max relative error {error:.2e}"


def test_registered():
    from workers.models.registry import model_class

    assert model_class({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}) is \
        Qwen2_5_VLForConditionalGeneration


@pytest.mark.parametrize("count", [1, 2])
def test_encode_matches_reference_image_features(hf, ours, images, count):
    chosen = images[:count]
    with torch.no_grad():
        reference = hf.model.get_image_features(torch.cat([p for p, _ in chosen]),
                                                torch.tensor([g for _, g in chosen])).pooler_output
    with torch.inference_mode():
        encoded = ours.encode(pixel_items(chosen, [0] * count))
    assert len(encoded) == count
    for got, want in zip(encoded, reference, strict=True):
        assert got.shape == (want.shape[0], 64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_vision_mlp_gives_the_same_features(checkpoint, images):
    """The GPU layout of the vision MLP (gate and up in one matrix, padded to 64 units) against
    the checkpoint layout, on the same weights (loaded twice, one copy repacked)."""
    from workers.loader import pack_weights_for_device

    plain, packed = load_ours(checkpoint), load_ours(checkpoint)
    pack_weights_for_device(packed)
    mlp = packed.visual.blocks[0].mlp
    assert mlp.gate_up_proj.weight.shape[0] % 128 == 0 and not hasattr(mlp, "gate_proj")
    items = pixel_items(images, [0] * len(images))
    with torch.inference_mode():
        for got, want in zip(packed.encode(items), plain.encode(items), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mrope_positions_match_get_rope_index(hf, ours, images):
    grids = [grid for _, grid in images]
    ids, offsets = build_prompt(ours, grids)
    positions, delta = ours.mrope_positions(ids, pixel_items(images, offsets))
    input_ids = torch.tensor([ids])
    reference, reference_delta = hf.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == ours.image_token_id).int(), image_grid_thw=torch.tensor(grids))
    assert positions.dtype == torch.int64 and positions.shape == (3, len(ids))
    assert torch.equal(positions, reference[:, 0])
    assert delta == int(reference_delta) and isinstance(delta, int)
    assert delta < 0   # the images take fewer positions than tokens

    text_only, text_delta = ours.mrope_positions([5, 6, 7], [])
    assert torch.equal(text_only, torch.arange(3).expand(3, -1)) and text_delta == 0


@pytest.mark.parametrize("count", [0, 1, 2])
def test_prefill_logits_match_reference(hf, ours, images, count):
    chosen = images[:count]
    ids, offsets = build_prompt(ours, [grid for _, grid in chosen])
    assert_logits_close(our_logits(ours, ids, pixel_items(chosen, offsets)), reference_logits(hf, ids, chosen))


def test_embeds_and_features_sources_match_pixels(hf, ours, images):
    from transformers.vision_utils import get_vision_window_index

    ids, offsets = build_prompt(ours, [grid for _, grid in images])
    items = pixel_items(images, offsets)
    expected = our_logits(ours, ids, items)
    with torch.inference_mode():
        embeds = ours.encode(items)
    embed_items = [MultiModalInput(item.hash, item.offset, item.num_tokens, "embeds", "image", data, item.grid_thw)
                   for item, data in zip(items, embeds, strict=True)]
    assert_logits_close(our_logits(ours, ids, embed_items), expected)

    # Features as defined by encode(): the last block's output, in the processor's patch order.
    vision = hf.config.vision_config
    feature_items = []
    for item in items:
        grid = torch.tensor([item.grid_thw])
        with torch.no_grad():
            windowed = hf.model.get_image_features(item.data, grid).last_hidden_state
        window_index, _ = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size,
                                                  vision.patch_size)
        unit = vision.spatial_merge_size ** 2
        features = torch.empty_like(windowed).view(-1, unit, windowed.shape[-1])
        features[window_index] = windowed.view(-1, unit, windowed.shape[-1])
        feature_items.append(MultiModalInput(item.hash, item.offset, item.num_tokens, "features", "image",
                                             features.view(-1, windowed.shape[-1]), item.grid_thw))
    assert_logits_close(our_logits(ours, ids, feature_items), expected)
    with torch.inference_mode():
        ours_features = ours.visual.features(items[0].data, ours.visual.prepare([items[0].grid_thw], items[0].data.device))
    torch.testing.assert_close(ours_features, feature_items[0].data, rtol=1e-5, atol=1e-5)


def test_transformers_layout_and_flat_hub_config(tmp_path, checkpoint, ours, images):
    """save_pretrained writes the hub's tensor names (model.layers..., visual...); a checkpoint in
    transformers' in-memory names, and an original hub config.json, load to the same model."""
    from safetensors.torch import load_file, save_file

    ids, offsets = build_prompt(ours, [grid for _, grid in images])
    items = pixel_items(images, offsets)
    expected = our_logits(ours, ids, items)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and "visual.blocks.0.attn.qkv.weight" in tensors

    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        elif name.startswith("visual."):
            name = "model." + name
        renamed[name] = tensor
    save_file(renamed, str(tmp_path / "model.safetensors"))
    config = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_logits_close(our_logits(load_vlm(tmp_path), ids, items), expected)

    # The original hub config: text settings at top level, rope_scaling of type "mrope", in_chans.
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**config, **text, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    vision = flat["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("rope_parameters")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(flat))
    assert_logits_close(our_logits(load_vlm(tmp_path), ids, items), expected)


def test_tied_embeddings(tmp_path, images):
    from transformers import Qwen2_5_VLForConditionalGeneration as Reference

    path = build_qwen2_5_vl_checkpoint(tmp_path, tie_word_embeddings=True)
    hf = Reference.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_vlm(path)
    assert not hasattr(ours, "lm_head")
    ids, offsets = build_prompt(ours, [images[0][1]])
    assert_logits_close(our_logits(ours, ids, pixel_items(images[:1], offsets)),
                        reference_logits(hf, ids, images[:1]))


def test_load_errors(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = dict(iter_safetensors(str(checkpoint)))
    model = Qwen2_5_VLForConditionalGeneration(config, max_model_len=64)
    with pytest.raises(ValueError, match="missing 1 tensors: visual.blocks.2.mlp.gate_proj.weight"):
        model.load_weights((n, t) for n, t in tensors.items() if n != "visual.blocks.2.mlp.gate_proj.weight")
    with pytest.raises(ValueError, match="unexpected tensor"):
        model.load_weights([*tensors.items(), ("visual.blocks.9.norm1.weight", torch.ones(32))])
    with pytest.raises(ValueError, match="has shape"):
        model.load_weights({**tensors, "visual.merger.mlp.2.bias": torch.zeros(3)}.items())


def test_encode_rejects_bad_items(ours, images):
    pixels, grid = images[0]
    bad = [MultiModalInput("a", 0, num_tokens(grid) + 1, "pixels", "image", pixels, grid),
           MultiModalInput("b", 0, num_tokens(grid), "pixels", "image", pixels[1:], grid),
           MultiModalInput("c", 0, 3, "embeds", "image", torch.zeros(3, 8)),
           MultiModalInput("d", 0, num_tokens(grid), "pixels", "video", pixels, grid)]
    for item in bad:
        with pytest.raises(ValueError):
            ours.encode([item])
