"""LLaVA (CLIP / SigLIP vision tower, Llama / Qwen2 / Qwen3 decoder) against transformers on tiny
random checkpoints (CPU, float32): image features, prefill logits with and without images, every
checkpoint layout, the "embeds" and "features" sources, loading errors and tensor parallelism."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.checkpoints_llava import IMAGE_TOKEN_ID, build_llava_checkpoint, image_processor, llava_config
from tests.model_harness import load_ours, prefill_logits
from workers.models.llava import LlavaArgs, LlavaForConditionalGeneration
from workers.models.registry import model_class
from workers.models.vision_encoders import VisionArgs, VisionTransformer
from workers.multimodal import MultiModalEmbeds, MultiModalInput

CASES = {
    "llama-clip": ("llama", "clip", {}),
    "qwen2-siglip": ("qwen2", "siglip", {}),
    "qwen3-clip": ("qwen3", "clip", {}),
    "qwen2-clip-two-layers": ("qwen2", "clip", dict(vision_feature_layer=[-3, -1], multimodal_projector_bias=False,
                                                     projector_hidden_act="gelu_pytorch_tanh")),
}


@dataclass
class Case:
    path: Path
    config: dict[str, Any]
    hf: Any                                 # transformers' LlavaForConditionalGeneration
    ours: LlavaForConditionalGeneration
    pixel_values: torch.Tensor              # [2, 3, H, W]: two images from the image processor

    @property
    def tokens_per_image(self) -> int:
        return self.ours.tokens_per_image

    def items(self, sources: list[str], data: list[torch.Tensor]) -> list[MultiModalInput]:
        return [MultiModalInput(f"image-{i}", 0, self.tokens_per_image, source, "image", d)
                for i, (source, d) in enumerate(zip(sources, data))]

    def pixel_items(self, count: int = 2) -> list[MultiModalInput]:
        return self.items(["pixels"] * count, list(self.pixel_values[:count]))

    @torch.inference_mode()
    def reference_logits(self, ids: list[int], num_images: int) -> torch.Tensor:
        pixels = self.pixel_values[:num_images] if num_images else None
        return self.hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]

    @torch.inference_mode()
    def reference_features(self) -> list[torch.Tensor]:
        """transformers' selected vision features of the two images (the "features" source)."""
        out = self.hf.model.vision_tower(self.pixel_values, output_hidden_states=True)
        layers = self.config["vision_feature_layer"]
        states = [out.hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if self.config["vision_feature_select_strategy"] == "default":
            states = [s[:, 1:] for s in states]
        return list(torch.cat(states, dim=-1))


def random_images(seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((40, 52), (64, 48))]


def prompt_ids(num_images: int, tokens_per_image: int) -> list[int]:
    ids = [1, 30, 31, 32]
    for i in range(num_images):
        ids += [IMAGE_TOKEN_ID] * tokens_per_image + [40 + i, 41 + i]
    return ids + [50, 51, 52]


def our_logits(model: LlavaForConditionalGeneration, ids: list[int],
               items: list[MultiModalInput]) -> torch.Tensor:
    mm = None
    if items:
        with torch.inference_mode():
            embeds = torch.cat(model.encode(items))
        rows = torch.tensor([i for i, token in enumerate(ids) if token == IMAGE_TOKEN_ID])
        mm = MultiModalEmbeds(rows, embeds)
    return prefill_logits(model, ids, torch.arange(len(ids)), mm)


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def fresh_model(case: Case) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(case.config, max_model_len=512).eval()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
    from transformers import LlavaForConditionalGeneration as HFLlava

    text, vision, overrides = CASES[request.param]
    path = build_llava_checkpoint(tmp_path_factory.mktemp(request.param), text, vision, **overrides)
    hf = HFLlava.from_pretrained(path, dtype=torch.float32).eval()
    pixel_values = image_processor(vision)(random_images(0), return_tensors="pt")["pixel_values"]
    return Case(path, hf.config.to_dict(), hf, load_ours(path), pixel_values)


def test_encode_matches_transformers_image_features(case: Case) -> None:
    with torch.inference_mode():
        ours = case.ours.encode(case.pixel_items())
        expected = case.hf.get_image_features(pixel_values=case.pixel_values).pooler_output
    assert len(ours) == 2
    for got, want in zip(ours, expected):
        assert got.shape == (case.tokens_per_image, case.ours.embed_width)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prefill_logits_match_transformers(case: Case, num_images: int) -> None:
    ids = prompt_ids(num_images, case.tokens_per_image)
    expected = case.reference_logits(ids, num_images)
    assert_close_logits(our_logits(case.ours, ids, case.pixel_items(num_images)), expected)
    if num_images == 2:   # the images matter: swapped, the logits differ
        swapped = case.pixel_items()[::-1]
        assert not torch.allclose(our_logits(case.ours, ids, swapped), expected, atol=1e-3)


def rename(tensors: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in tensors.items():
        prefix = next(p for p in prefixes if name.startswith(p))
        renamed[prefixes[prefix] + name[len(prefix):]] = tensor
    return renamed


# From the layout transformers 5 saves to an older one.
OLD_HUB_LAYOUT = {"language_model.": "language_model.", "vision_tower.": "vision_tower.vision_model.",
                  "multi_modal_projector.": "multi_modal_projector."}
TRANSFORMERS_4_LAYOUT = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                         "vision_tower.": "model.vision_tower.vision_model.",
                         "multi_modal_projector.": "model.multi_modal_projector."}


def unused_vision_tensor(case: Case, name: str) -> bool:
    """Tensors no feature needs: the post-layernorm, SigLIP's head, layers past the deepest feature layer."""
    args = LlavaArgs.from_hf_config(case.config)
    parts = name.split(".")
    if "post_layernorm" in parts or "head" in parts:
        return True
    return "layers" in parts and int(parts[parts.index("layers") + 1]) >= max(args.feature_layers)


def test_old_hub_layout_from_disk(case: Case, tmp_path: Path) -> None:
    saved = load_file(case.path / "model.safetensors")
    tensors = rename(saved, OLD_HUB_LAYOUT)
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in tensors
    # Unused vision tensors may be left out of a checkpoint.
    tensors = {k: v for k, v in tensors.items()
               if not (k.startswith("vision_tower.") and unused_vision_tensor(case, k))}
    for item in case.path.iterdir():
        if item.suffix != ".safetensors":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = prompt_ids(2, case.tokens_per_image)
    assert_close_logits(our_logits(load_ours(tmp_path), ids, case.pixel_items()), case.reference_logits(ids, 2))


@pytest.mark.parametrize("layout", ["transformers-4", "in-memory"])
def test_other_layouts(case: Case, layout: str) -> None:
    if layout == "in-memory":
        tensors = dict(case.hf.state_dict())
        assert "model.language_model.embed_tokens.weight" in tensors
    else:
        tensors = rename(load_file(case.path / "model.safetensors"), TRANSFORMERS_4_LAYOUT)
    model = fresh_model(case)
    model.load_weights(tensors.items())
    ids = prompt_ids(1, case.tokens_per_image)
    assert_close_logits(our_logits(model, ids, case.pixel_items(1)), case.reference_logits(ids, 1))


@pytest.mark.parametrize("sources", [["embeds", "embeds"], ["features", "features"], ["features", "pixels"],
                                     ["pixels", "embeds"]])
def test_embeds_and_features_sources(case: Case, sources: list[str]) -> None:
    with torch.inference_mode():
        embeds = case.hf.get_image_features(pixel_values=case.pixel_values).pooler_output
    features = case.reference_features()
    assert features[0].shape == (case.tokens_per_image, case.ours.llava.feature_width)
    data = {"pixels": list(case.pixel_values), "embeds": embeds, "features": features}
    items = case.items(sources, [data[source][i] for i, source in enumerate(sources)])
    ids = prompt_ids(2, case.tokens_per_image)
    assert_close_logits(our_logits(case.ours, ids, items), our_logits(case.ours, ids, case.pixel_items()))
    assert_close_logits(our_logits(case.ours, ids, items), case.reference_logits(ids, 2))


def test_vision_tower_hidden_states(case: Case) -> None:
    """Every hidden state as transformers numbers them, and SigLIP's post-layernormed last one."""
    args = VisionArgs.from_hf_config(case.config["vision_config"])
    tower = VisionTransformer(args, post_layernorm=True).eval()
    state = {k: v for k, v in case.hf.model.vision_tower.state_dict().items() if not k.startswith("head.")}
    tower.load_state_dict(state)
    with torch.inference_mode():
        expected = case.hf.model.vision_tower(case.pixel_values, output_hidden_states=True)
        indices = list(range(-args.num_layers - 1, args.num_layers + 1))
        for index, got in zip(indices, tower(case.pixel_values, indices)):
            torch.testing.assert_close(got, expected.hidden_states[index], rtol=0, atol=1e-5)
        if args.family == "siglip":
            torch.testing.assert_close(tower.last_hidden_state(case.pixel_values), expected.last_hidden_state,
                                       rtol=0, atol=1e-5)


def test_unneeded_vision_layers_are_not_built(case: Case) -> None:
    args = case.ours.llava
    assert len(case.ours.vision_tower.encoder.layers) == max(args.feature_layers)
    assert not hasattr(case.ours.vision_tower, "post_layernorm")


# --- configs, inputs and loading errors (one checkpoint) ------------------------------------


@pytest.fixture(scope="module")
def llama_clip(tmp_path_factory) -> Case:
    from transformers import LlavaForConditionalGeneration as HFLlava

    path = build_llava_checkpoint(tmp_path_factory.mktemp("llama-clip"))
    hf = HFLlava.from_pretrained(path, dtype=torch.float32).eval()
    pixel_values = image_processor("clip")(random_images(1), return_tensors="pt")["pixel_values"]
    return Case(path, hf.config.to_dict(), hf, load_ours(path), pixel_values)


def test_registered() -> None:
    assert model_class({"architectures": ["LlavaForConditionalGeneration"]}) is LlavaForConditionalGeneration


def test_settings_of_a_sparse_old_config() -> None:
    # llava-1.5-7b-hf's config.json leaves the rest to transformers' defaults.
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
              "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                              "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                              "torch_dtype": "float16", "vocab_size": 32064},
              "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                "model_type": "clip_vision_model", "num_attention_heads": 16,
                                "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                                "vocab_size": 32000}}
    args = LlavaArgs.from_hf_config(config)
    decoder = LlavaForConditionalGeneration.make_args(args.text_config)
    assert (decoder.hidden_size, decoder.num_layers, decoder.num_heads, decoder.num_kv_heads) == (4096, 32, 32, 32)
    assert (decoder.vocab_size, decoder.intermediate_size, decoder.tie_word_embeddings) == (32064, 11008, False)
    assert args.vision == VisionArgs("clip", 1024, 4096, 24, 16, 3, 336, 14, 1e-5, "quick_gelu")
    assert (args.image_token_id, args.feature_layers, args.tokens_per_image, args.feature_width) == (
        32000, (23,), 576, 1024)
    assert args.projector_bias and args.projector_act == "gelu"


def test_config_errors() -> None:
    config = llava_config().to_dict()
    with pytest.raises(ValueError, match=r"unsupported LLaVA language model 'mistral'"):
        LlavaArgs.from_hf_config({**config, "text_config": {**config["text_config"], "model_type": "mistral"}})
    with pytest.raises(ValueError, match=r"hidden state -5 is out of range"):
        LlavaArgs.from_hf_config({**config, "vision_feature_layer": -5})


def test_bad_items(llama_clip: Case) -> None:
    model, n = llama_clip.ours, llama_clip.tokens_per_image
    image = llama_clip.pixel_values[0]
    bad = [
        (MultiModalInput("a", 0, n, "pixels", "image", image[:, :16]), r"pixels item 'a' has shape"),
        (MultiModalInput("b", 0, n + 1, "pixels", "image", image), rf"gives {n} tokens, the item has {n + 1}"),
        (MultiModalInput("c", 0, n, "pixels", "video", image), r"images only, got modality 'video'"),
        (MultiModalInput("d", 0, n, "features", "image", torch.zeros(n, 33)), r"features item 'd' has shape"),
        (MultiModalInput("e", 0, n, "embeds", "image", torch.zeros(n, 63)), r"embeds item 'e' has shape"),
        (MultiModalInput("f", 0, n, "tokens", "image", image), r"unknown multimodal source 'tokens'"),
    ]
    for item, message in bad:
        with pytest.raises(ValueError, match=message):
            model.encode([item])


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("vision_tower.encoder.layers.1.mlp.fc1.weight"),
     r"missing 1 tensors: vision_tower\.encoder\.layers\.1\.mlp\.fc1\.weight"),
    (lambda t: t.pop("multi_modal_projector.linear_2.bias"), r"missing 1 tensors: multi_modal_projector\.linear_2"),
    (lambda t: t.pop("language_model.model.layers.0.self_attn.k_proj.weight"),
     r"missing 1 tensors: model\.layers\.0\.self_attn\.k_proj\.weight"),
    (lambda t: t.update({"vision_tower.encoder.layers.3.mlp.fc1.weight": torch.zeros(64, 32)}),
     r"unexpected tensor 'vision_tower\.encoder\.layers\.3\.mlp\.fc1\.weight'"),
    (lambda t: t.update({"vision_tower.head.probe": torch.zeros(1, 1, 32)}), r"unexpected tensor 'vision_tower\.head"),
    (lambda t: t.update({"multi_modal_projector.linear_1.weight": torch.zeros(64, 64)}),
     r"tensor 'multi_modal_projector\.linear_1\.weight' has shape \(64, 64\), expected \(64, 32\)"),
])
def test_loading_errors(llama_clip: Case, edit, message: str) -> None:
    tensors = load_file(llama_clip.path / "model.safetensors")
    edit(tensors)
    with pytest.raises(ValueError, match=message):
        fresh_model(llama_clip).load_weights(tensors.items())


def test_tensor_parallel_rank_keeps_the_vision_tower_whole(llama_clip: Case, monkeypatch) -> None:
    """Rank 1 of 2 reads lazy safetensors slices: decoder tensors are split, the vision tower and
    projector arrive whole."""
    import workers.loader as loader
    import workers.models.llama as llama

    for module in (llama, loader):
        monkeypatch.setattr(module, "tp_size", lambda: 2)
    monkeypatch.setattr(llama, "tp_rank", lambda: 1)
    model = fresh_model(llama_clip)
    model.load_weights(loader.iter_safetensors(str(llama_clip.path)))
    saved = load_file(llama_clip.path / "model.safetensors")
    params = dict(model.named_parameters())
    for name in ("encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.mlp.fc1.weight",
                 "embeddings.position_embedding.weight"):
        torch.testing.assert_close(params["vision_tower." + name], saved["vision_tower." + name], rtol=0, atol=0)
    torch.testing.assert_close(params["multi_modal_projector.linear_1.weight"],
                               saved["multi_modal_projector.linear_1.weight"], rtol=0, atol=0)
    q_proj = saved["language_model.model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(params["model.layers.0.self_attn.qkv_proj.weight"][:32], q_proj[32:], rtol=0, atol=0)
