"""Qwen3-VL against transformers on a tiny random checkpoint: vision encoder with DeepStack,
3-D positions, logits with and without images, precomputed embeddings, chunked prefill, the
checkpoint layout and tensor-parallel loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import workers.distributed as distributed
from tests.checkpoints_qwen3_vl import build_qwen3_vl_checkpoint
from tests.model_harness import load_ours, prefill_logits
from workers.layers.attention_base import AttentionMetadata
from workers.layers.attention_torch import TorchAttentionBackend
from workers.loader import iter_safetensors
from workers.models.qwen3_vl import Qwen3VLForConditionalGeneration
from workers.multimodal import MultiModalEmbeds, MultiModalInput

IMAGE_SIZES = [(48, 64), (40, 30)]   # (height, width): grids 12x16 and 10x8, 48 and 20 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_qwen3_vl_checkpoint(tmp_path_factory.mktemp("qwen3_vl"))


@pytest.fixture(scope="module")
def config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    return HFQwen3VL.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_ours(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def images(checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and image_grid_thw of IMAGE_SIZES, from the checkpoint's image processor."""
    from transformers import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    processed = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)(images=pictures, return_tensors="pt")
    return processed["pixel_values"], processed["image_grid_thw"]


def pixel_items(images, which: list[int], merge: int = 2) -> list[MultiModalInput]:
    """Items for the chosen images, offsets unset."""
    pixel_values, grids = images
    patches = grids.prod(-1).tolist()
    starts = np.cumsum([0] + patches).tolist()
    return [MultiModalInput(f"image-{i}", 0, patches[i] // merge ** 2, "pixels", "image",
                            pixel_values[starts[i]:starts[i + 1]], tuple(grids[i].tolist()))
            for i in which]


def prompt_with(tokenizer, config, items: list[MultiModalInput], texts: list[str]) -> list[int]:
    """texts[0] <image 0> texts[1] <image 1> ... texts[-1], setting each item's offset."""
    ids = tokenizer(texts[0]).input_ids
    for item, text in zip(items, texts[1:]):
        ids.append(config["vision_start_token_id"])
        item.offset = len(ids)
        ids += [config["image_token_id"]] * item.num_tokens
        ids.append(config["vision_end_token_id"])
        ids += tokenizer(text).input_ids
    return ids


def hf_features(hf, images, which: list[int]) -> list[torch.Tensor]:
    pixel_values, grids = images
    chosen = pixel_items(images, which)
    out = hf.model.get_image_features(torch.cat([item.data for item in chosen]), grids[which])
    return [torch.cat([out.pooler_output[j], *(level[j] for level in out.deepstack_features)], dim=-1)
            for j in range(len(which))]


@torch.inference_mode()
def hf_logits(hf, config, ids: list[int], images, which: list[int]) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    if not which:
        return hf(input_ids=input_ids).logits[0]
    pixel_values, grids = images
    pixels = torch.cat([item.data for item in pixel_items(images, which)])
    mm_token_type_ids = (input_ids == config["image_token_id"]).int()
    return hf(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grids[which],
              mm_token_type_ids=mm_token_type_ids).logits[0]


def our_logits(model, ids: list[int], items: list[MultiModalInput]) -> torch.Tensor:
    positions, _ = model.mrope_positions(ids, items)
    mm = None
    if items:
        with torch.inference_mode():
            embeds = torch.cat(model.encode(items))
        rows = torch.cat([torch.arange(item.offset, item.end) for item in items])
        mm = MultiModalEmbeds(rows, embeds)
    return prefill_logits(model, ids, positions, mm)


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < tol, f"relative error {error:.2e}"


def test_encode_matches_transformers_image_features(hf, ours, images):
    with torch.inference_mode():
        expected = hf_features(hf, images, [0, 1])
        single = ours.encode(pixel_items(images, [0]))
        both = ours.encode(pixel_items(images, [0, 1]))
    assert ours.embed_width == 64 * 3 and expected[0].shape == (48, ours.embed_width)
    torch.testing.assert_close(single[0], expected[0], rtol=0, atol=1e-5)
    for got, want in zip(both, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_mrope_positions_match_get_rope_index(hf, ours, tokenizer, config, images):
    items = pixel_items(images, [0, 1])
    ids = prompt_with(tokenizer, config, items, ["Look at this:", " and this", " - which is larger?"])
    input_ids = torch.tensor([ids])
    expected, expected_delta = hf.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == config["image_token_id"]).int(),
        image_grid_thw=images[1])
    positions, delta = ours.mrope_positions(ids, items)
    assert positions.dtype == torch.int64
    assert torch.equal(positions, expected[:, 0])
    assert delta == int(expected_delta) < 0


@pytest.mark.parametrize("which", [[0], [1, 0], []], ids=["one-image", "two-images", "text-only"])
def test_prefill_logits_match_transformers(hf, ours, tokenizer, config, images, which):
    items = pixel_items(images, which)
    texts = ["Describe", " the picture", " then this one."][:len(which) + 1]
    ids = prompt_with(tokenizer, config, items, texts if which else ["Hello world! What is the capital?"])
    expected = hf_logits(hf, config, ids, images, which)
    actual = our_logits(ours, ids, items)
    assert_relative(actual, expected, 1e-4)


def test_images_change_the_logits(ours, tokenizer, config, images):
    # Guards the comparisons above against vision features too small to matter.
    first, second = pixel_items(images, [0]), pixel_items(images, [0])
    ids = prompt_with(tokenizer, config, first, ["Describe", " it."])
    plain = our_logits(ours, ids, [])
    with_image = our_logits(ours, ids, first)
    second[0].data = second[0].data.flip(0)
    other_image = our_logits(ours, ids, second)
    assert (with_image - plain).abs().max() > 0.1 * plain.abs().max()
    assert (with_image - other_image).abs().max() > 0.01 * plain.abs().max()


def test_embeds_source_gives_the_same_logits(ours, tokenizer, config, images):
    items = pixel_items(images, [0, 1])
    ids = prompt_with(tokenizer, config, items, ["A", " B", " C"])
    with torch.inference_mode():
        encoded = ours.encode(items)
    embeds = [MultiModalInput(item.hash, item.offset, item.num_tokens, "embeds", "image", data.clone(),
                              item.grid_thw) for item, data in zip(items, encoded)]
    torch.testing.assert_close(our_logits(ours, ids, embeds), our_logits(ours, ids, items), rtol=0, atol=1e-6)
    # Pixel and embedding items in one call keep their order.
    mixed = ours.encode([embeds[0], items[1]])
    torch.testing.assert_close(mixed[1], encoded[1], rtol=0, atol=1e-6)


def test_encode_rejects_bad_items(ours, images):
    item = pixel_items(images, [0])[0]
    features = MultiModalInput("f", 0, item.num_tokens, "features", "image", torch.zeros(item.num_tokens, 64))
    with pytest.raises(ValueError, match="features"):
        ours.encode([features])
    narrow = MultiModalInput("e", 0, item.num_tokens, "embeds", "image", torch.zeros(item.num_tokens, 64))
    with pytest.raises(ValueError, match="DeepStack"):
        ours.encode([narrow])
    item.num_tokens += 1
    with pytest.raises(ValueError, match="tokens"):
        ours.encode([item])


@torch.inference_mode()
def test_chunked_prefill_splitting_an_image(ours, tokenizer, config, images):
    items = pixel_items(images, [0, 1])
    ids = prompt_with(tokenizer, config, items, ["Describe", " and", " now."])
    full = our_logits(ours, ids, items)
    positions, _ = ours.mrope_positions(ids, items)
    embeds = torch.cat(ours.encode(items))
    rows = torch.cat([torch.arange(item.offset, item.end) for item in items])
    split = items[0].offset + 17    # inside the first image
    n, block_size = len(ids), 16
    num_blocks = -(-n // block_size)
    backend = TorchAttentionBackend()
    cache = torch.zeros(ours.args.num_layers, 2, num_blocks, block_size, ours.shard.num_kv_heads,
                        ours.args.head_dim)
    for i, attn in enumerate(ours.attention_layers):
        attn.backend, attn.k_cache, attn.v_cache = backend, cache[i, 0], cache[i, 1]
    chunks = []
    for start, end in ((0, split), (split, n)):
        meta = AttentionMetadata(query_lens=[end - start], seq_lens=[end],
                                 slot_mapping=torch.arange(start, end),
                                 block_tables=torch.arange(num_blocks)[None], block_size=block_size)
        backend.prepare(meta)
        in_chunk = (rows >= start) & (rows < end)
        mm = MultiModalEmbeds(rows[in_chunk] - start, embeds[in_chunk])
        hidden = ours(torch.tensor(ids[start:end]), positions[:, start:end], meta, mm)
        chunks.append(ours.compute_logits(hidden).float())
    assert_relative(torch.cat(chunks), full, 1e-5)


def test_checkpoint_layout_is_the_published_one(ours, checkpoint):
    # transformers 5 saves the names of the published Qwen3-VL checkpoints.
    saved = {name for name, _ in iter_safetensors(str(checkpoint))}
    assert saved == set(ours.checkpoint_names())
    assert {"model.visual.patch_embed.proj.weight", "model.visual.deepstack_merger_list.1.norm.weight",
            "model.language_model.layers.2.self_attn.q_norm.weight"} <= saved


def test_load_errors(config, checkpoint):
    tensors = dict(iter_safetensors(str(checkpoint)))
    model = Qwen3VLForConditionalGeneration(config, 256)
    with pytest.raises(ValueError, match="missing"):
        model.load_weights((k, v) for k, v in tensors.items() if "visual.blocks.1." not in k)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_weights([*tensors.items(), ("model.visual.extra.weight", torch.zeros(1))])
    bad = {**tensors, "model.visual.pos_embed.weight": torch.zeros(81, 32)}
    with pytest.raises(ValueError, match="shape"):
        model.load_weights(bad.items())


def test_tied_word_embeddings(tmp_path, tokenizer, config, images):
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    path = build_qwen3_vl_checkpoint(tmp_path / "tied", tie_word_embeddings=True,
                                     text_config={"num_hidden_layers": 2})
    hf = HFQwen3VL.from_pretrained(path, dtype=torch.float32).eval()
    model = load_ours(path)
    assert model.args.tie_word_embeddings and not hasattr(model, "lm_head")
    items = pixel_items(images, [1])
    ids = prompt_with(tokenizer, config, items, ["Tied", " weights."])
    assert_relative(our_logits(model, ids, items), hf_logits(hf, config, ids, images, [1]), 1e-4)


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_slices_only_the_language_model(monkeypatch, config, checkpoint, rank):
    monkeypatch.setattr(distributed, "_rank", rank)
    monkeypatch.setattr(distributed, "_size", 2)
    model = Qwen3VLForConditionalGeneration(config, 256)
    model.load_weights(iter_safetensors(str(checkpoint)))   # lazy slices under TP
    full = _whole_tensors(checkpoint)
    params = dict(model.named_parameters())
    for name, tensor in full.items():
        if name.startswith("model.visual."):
            assert torch.equal(params[name], tensor), name
    embed = params["model.language_model.embed_tokens.weight"]
    assert embed.shape == (256, 64)
    assert torch.equal(embed, full["model.language_model.embed_tokens.weight"][rank * 256:(rank + 1) * 256])
    qkv = params["model.language_model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((2 + 1 + 1) * 32, 64)    # 2 of 4 query heads, 1 of 2 KV heads, head_dim 32


def _whole_tensors(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))
