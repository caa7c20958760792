"""Vision-language models end to end: images in chat messages through the engine, against
transformers' generate and forward on the same tiny random checkpoints."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from streamvlm import SamplingParams
from streamvlm.contract.protocol import AddRequest
from tests.helpers import local_llm, make_worker, worker_of
from workers.scheduler import ScheduledChunk
from workers.sequence import Sequence

NUM_NEW = 32
BLOCK = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


def _build_qwen2_5_vl(path: Path) -> Path:
    from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint
    return build_qwen2_5_vl_checkpoint(path)


def _build_qwen3_vl(path: Path) -> Path:
    from tests.checkpoints_qwen3_vl import build_qwen3_vl_checkpoint
    return build_qwen3_vl_checkpoint(path)


def _build_llava(path: Path) -> Path:
    from tests.checkpoints_llava import build_llava_checkpoint
    return build_llava_checkpoint(path, text="qwen2", vision="clip")


@dataclass(frozen=True)
class Family:
    build: Callable[[Path], Path]
    hf_class: str
    image_processor: str
    placeholder: str        # what the chat template writes per image
    image_token: str        # the token that expands


FAMILIES = {
    "qwen2_5_vl": Family(_build_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration",
                         "Qwen2VLImageProcessorPil",
                         "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"),
    "qwen3_vl": Family(_build_qwen3_vl, "Qwen3VLForConditionalGeneration",
                       "Qwen2VLImageProcessorPil",
                       "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"),
    "llava": Family(_build_llava, "LlavaForConditionalGeneration", "CLIPImageProcessorPil",
                    "<image>", "<image>"),
}
NAMES = list(FAMILIES)


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


CAT = random_image(1, (64, 48))
DOG = random_image(2, (40, 72))
BIRD = random_image(3, (56, 56))
FISH = random_image(4, (56, 56))     # BIRD's size: the same placeholder tokens


def conversation(images: list[Image.Image], text: str = "Describe the picture.") -> list[dict]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class Reference:
    """transformers on the same checkpoint, fed by transformers' own image processor."""

    def __init__(self, family: Family, path: Path) -> None:
        import transformers

        self.family = family
        self.model = getattr(transformers, family.hf_class).from_pretrained(
            path, dtype=torch.float32).eval()
        self.processor = getattr(transformers, family.image_processor).from_pretrained(path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.config = self.model.config

    def tokens_per_image(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        if "image_grid_thw" in inputs:
            merge = self.config.vision_config.spatial_merge_size
            return [int(g.prod()) // merge ** 2 for g in inputs["image_grid_thw"]]
        vision = self.config.vision_config
        count = (vision.image_size // vision.patch_size) ** 2
        if self.config.vision_feature_select_strategy == "full":
            count += 1
        return [count] * inputs["pixel_values"].shape[0]

    def inputs(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        images = [p["image"] for m in messages if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] == "image"]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        inputs: dict[str, torch.Tensor] = {}
        if images:
            inputs = dict(self.processor(images=images, return_tensors="pt"))
            pieces = text.split(self.family.image_token)
            counts = self.tokens_per_image(inputs)
            text = pieces[0] + "".join(self.family.image_token * n + rest
                                       for n, rest in zip(counts, pieces[1:]))
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if "image_grid_thw" in inputs:   # what transformers' Qwen-VL processors return beside the ids
            inputs["mm_token_type_ids"] = (ids == self.config.image_token_id).int()
        return {"input_ids": ids, **inputs}

    @torch.inference_mode()
    def greedy(self, messages: list[dict]) -> list[int]:
        inputs = self.inputs(messages)
        out = self.model.generate(**inputs, max_new_tokens=NUM_NEW, do_sample=False,
                                  min_new_tokens=NUM_NEW, pad_token_id=0)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    @torch.inference_mode()
    def logits(self, messages: list[dict]) -> tuple[list[int], torch.Tensor]:
        inputs = self.inputs(messages)
        return inputs["input_ids"][0].tolist(), self.model(**inputs).logits[0].float()


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {name: family.build(root / name) for name, family in FAMILIES.items()}


@pytest.fixture(scope="module")
def references(family_paths) -> dict[str, Reference]:
    return {name: Reference(FAMILIES[name], path) for name, path in family_paths.items()}


_LLMS: dict[tuple, Any] = {}


@pytest.fixture(scope="module")
def llms(family_paths):
    def get(name: str, **kwargs: Any) -> Any:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in _LLMS:
            options = {"max_model_len": 512, "block_size": BLOCK, **kwargs}
            _LLMS[key] = local_llm(family_paths[name], **options)
        return _LLMS[key]
    yield get
    for llm in _LLMS.values():
        llm.shutdown()
    _LLMS.clear()


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


CASES = {"one_image": [CAT], "two_images": [CAT, DOG], "text_only": []}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(name: str, case: str, llms, references) -> None:
    messages = conversation(CASES[case])
    [out] = llms(name).chat(messages, GREEDY)
    assert out.token_ids == references[name].greedy(messages)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_text_and_images(name: str, llms, references) -> None:
    conversations = [conversation([DOG]), conversation([], "Just text here."),
                     conversation([BIRD, CAT], "Compare them.")]
    outputs = llms(name, max_num_batched_tokens=64).chat(conversations, GREEDY)
    for messages, out in zip(conversations, outputs):
        assert out.token_ids == references[name].greedy(messages)


def engine_logits(llm: Any, prepared: Any, chunks: list[int]) -> torch.Tensor:
    """Teacher-forced logits of a prepared prompt, computed in chunks through the worker."""
    worker = worker_of(llm)
    ids = prepared.prompt_token_ids
    seq = Sequence("teacher", ids, SamplingParams(), [], 0)
    worker._attach_multimodal(seq, AddRequest(request_id="teacher", prompt_token_ids=ids,
                                              params=SamplingParams(),
                                              mm_items=prepared.mm_items))
    rows = []
    try:
        for size in chunks:
            assert worker.pool.allocate(seq, size)
            rows.append(worker.runner.forward_all_logits(
                [ScheduledChunk(seq, seq.num_computed_tokens, size)]))
            seq.num_computed_tokens += size
            seq.release_encoder_outputs()
    finally:
        worker.pool.free_sequence(seq)
    return torch.cat(rows)


@pytest.mark.parametrize("pattern", ["whole", "through_images"])
@pytest.mark.parametrize("name", NAMES)
def test_teacher_forced_logits(name: str, pattern: str, llms, references) -> None:
    messages = conversation([CAT, DOG], "What differs?")
    llm = llms(name)
    prepared = llm._call(llm.engine.prepare_prompt(messages))
    ids, expected = references[name].logits(messages)
    assert prepared.prompt_token_ids == ids
    n = len(ids)
    if pattern == "whole":
        chunks = [n]
    else:
        # Chunk edges inside each image's placeholder run, and one-token chunks at the end.
        item = prepared.mm_items[0]
        first = item.offset + item.num_tokens // 3
        second = prepared.mm_items[1].offset + 2
        chunks = [first, 7, second - first - 7, n - second - 3, 1, 1, 1]
    assert sum(chunks) == n and min(chunks) > 0
    assert_close_logits(engine_logits(llm, prepared, chunks), expected)


@pytest.mark.parametrize("name", NAMES)
def test_prefix_cache_keys_blocks_by_image(name: str, llms, references) -> None:
    llm = llms(name, encoder_cache_tokens=0)
    text = "Tell me what you see in this picture."
    [first] = llm.chat(conversation([BIRD], text), GREEDY)
    [same] = llm.chat(conversation([BIRD], text), GREEDY)
    [other] = llm.chat(conversation([FISH], text), GREEDY)
    prepared = llm._call(llm.engine.prepare_prompt(conversation([FISH], text)))
    image_start = prepared.mm_items[0].offset
    assert first.num_cached_tokens == 0
    # Same text and image: every full block but the last token's hits.
    assert same.num_cached_tokens == (len(prepared.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert same.token_ids == first.token_ids
    # Another image: only the blocks before the image's first placeholder may hit.
    assert other.num_cached_tokens == image_start // BLOCK * BLOCK
    assert other.token_ids == references[name].greedy(conversation([FISH], text))


@pytest.mark.parametrize("name", NAMES)
def test_repeated_image_is_encoded_once(name: str, llms) -> None:
    llm = llms(name, enable_prefix_caching=False)
    before = llm.stats()
    llm.chat([conversation([CAT], "First question?"), conversation([CAT], "Second question?")],
             GREEDY)
    llm.chat(conversation([CAT], "Third question?"), GREEDY)
    after = llm.stats()
    assert after.num_encoded_items - before.num_encoded_items == 1
    assert after.encoder_cache_hits - before.encoder_cache_hits >= 1


def drive_burst(worker: Any, prepared: list[Any]) -> tuple[list[list[int]], list[int]]:
    """Add the prepared prompts at once and step the worker until they end: each one's greedy
    tokens, and how many images each step encoded."""
    for index, prompt in enumerate(prepared):
        worker.add_request(AddRequest(request_id=f"r{index}", prompt_token_ids=prompt.prompt_token_ids,
                                      params=GREEDY, mm_items=prompt.mm_items))
    tokens: list[list[int]] = [[] for _ in prepared]
    encoded_per_step: list[int] = []
    encoded = 0
    while worker.has_work():
        out = worker.step()
        for delta in out.request_deltas():
            assert delta.error is None
            tokens[int(delta.request_id[1:])] += delta.new_token_ids
        encoded_per_step.append(out.stats.num_encoded_items - encoded)
        encoded = out.stats.num_encoded_items
    return tokens, encoded_per_step


def test_encoder_budget_spreads_a_burst_of_images_over_steps(family_paths, llms, references) -> None:
    """Four image requests arrive together. Without a binding encoder budget the first step encodes
    all four images; with a budget of the smallest image each step encodes one (a larger one alone),
    the text before an image running meanwhile. The tokens are the same either way."""
    name = "qwen2_5_vl"
    conversations = [conversation([image], f"Question {index}?")
                     for index, image in enumerate((CAT, DOG, BIRD, FISH))]
    llm = llms(name)
    prepared = [llm._call(llm.engine.prepare_prompt(messages)) for messages in conversations]
    sizes = [prompt.mm_items[0].num_tokens for prompt in prepared]
    options = dict(max_model_len=512, block_size=BLOCK, max_num_batched_tokens=512)
    unbounded = make_worker(family_paths[name], **options, max_num_encoder_tokens=sum(sizes))
    bounded = make_worker(family_paths[name], **options, max_num_encoder_tokens=min(sizes))
    tokens, encoded = drive_burst(unbounded, prepared)
    bounded_tokens, bounded_encoded = drive_burst(bounded, prepared)
    expected = [references[name].greedy(messages) for messages in conversations]
    assert bounded_tokens == tokens == expected
    assert encoded[0] == 4 and sum(encoded) == 4
    assert bounded_encoded[:4] == [1, 1, 1, 1] and sum(bounded_encoded) == 4
    # The last image's request starts three steps later, then decodes as many tokens.
    assert bounded.num_steps == unbounded.num_steps + 3
    # The same budget set on the engine, through the config the engine core resolves.
    outputs = llms(name, max_num_encoder_tokens=min(sizes)).chat(conversations, GREEDY)
    assert [out.token_ids for out in outputs] == expected


@pytest.mark.parametrize("name", NAMES)
def test_precomputed_embeddings_give_the_same_tokens(name: str, llms, references) -> None:
    from workers.multimodal import MultiModalInput

    llm = llms(name)
    messages = conversation([DOG, CAT], "Which is brighter?")
    [from_pixels] = llm.chat(messages, GREEDY)
    prepared = llm._call(llm.engine.prepare_prompt(messages))
    model = worker_of(llm).runner.model
    parts: list[dict[str, Any]] = []
    for item in prepared.mm_items:
        with torch.inference_mode():
            [embeds] = model.encode([MultiModalInput.from_item(item)])
        parts.append({"type": "image_embeds", "image_embeds": embeds.clone(),
                      "image_grid_thw": item.grid_thw})
    embeds_messages = [{"role": "user", "content": [*parts, {"type": "text",
                                                             "text": "Which is brighter?"}]}]
    [from_embeds] = llm.chat(embeds_messages, GREEDY)
    assert from_embeds.token_ids == from_pixels.token_ids == references[name].greedy(messages)


@pytest.mark.parametrize("name", NAMES)
def test_pretokenized_prompt_with_images(name: str, llms, references) -> None:
    llm = llms(name)
    messages = conversation([CAT])
    ids = references[name].inputs(messages)["input_ids"][0].tolist()
    tokenizer = references[name].tokenizer
    token = tokenizer.convert_tokens_to_ids(FAMILIES[name].image_token)
    collapsed = [t for i, t in enumerate(ids) if t != token or i == 0 or ids[i - 1] != token]
    expected = references[name].greedy(messages)
    for prompt_ids in (ids, collapsed):   # expanded placeholders, or one per image
        [out] = llm.generate({"prompt_token_ids": prompt_ids, "images": [png_bytes(CAT)]}, GREEDY)
        assert out.token_ids == expected


@pytest.mark.parametrize("name", NAMES)
def test_bad_item_fails_only_its_request(name: str, llms, references) -> None:
    """A bad image fails its own request only: embeddings whose width is off pass the engine
    core (only their rows are checked there) and fail in the worker's encoder, which ends that
    request with finish_reason "error"; an undecodable image fails in prepare_prompt with a
    ValueError. Concurrent good requests give the reference tokens, and every block is freed."""
    import asyncio

    llm = llms(name)
    engine = llm.engine
    # Images no other test encodes: the encoder cache misses, so the good items and the bad one
    # go to the encoder together (at least when they share a step) and the batch is retried
    # item by item.
    goods = [conversation([random_image(11, (48, 64))], "What is in the image?"),
             conversation([random_image(12, (64, 40))], "Name the colours.")]
    shape_of = llm._call(engine.prepare_prompt(conversation([random_image(13, (56, 48))])))
    [item] = shape_of.mm_items
    width = worker_of(llm).runner.model.embed_width
    wrong = torch.randn(item.num_tokens, width + 3)
    bad_part: dict[str, Any] = {"type": "image_embeds", "image_embeds": wrong}
    if item.grid_thw is not None:
        bad_part["image_grid_thw"] = item.grid_thw
    bad = [{"role": "user", "content": [bad_part, {"type": "text", "text": "And this one?"}]}]
    undecodable = conversation([], "Look at this.")
    undecodable[0]["content"].insert(0, {"type": "image", "image": b"not an image"})
    expected = [references[name].greedy(messages) for messages in goods]

    async def run_all(prompts: list[Any]) -> list[Any]:
        prepared = await asyncio.gather(*(engine.prepare_prompt(p) for p in prompts))
        return await asyncio.gather(*(engine.generate(p, GREEDY) for p in prepared))

    # The bad embeddings reach the worker and fail there.
    first, broken, second = llm._call(run_all([goods[0], bad, goods[1]]))
    assert broken.finish_reason == "error" and broken.token_ids == []
    assert broken.error is not None and "cannot encode image" in broken.error
    assert f"({item.num_tokens}, {width + 3})" in broken.error   # names the bad shape
    assert [first.token_ids, second.token_ids] == expected
    assert first.finish_reason == second.finish_reason == "length"
    assert llm.stats().kv_blocks_used == 0

    # An undecodable image is refused before the engine core takes the request.
    async def with_undecodable() -> list[Any]:
        return await asyncio.gather(engine.generate(goods[0], GREEDY),
                                    engine.generate(undecodable, GREEDY),
                                    engine.generate(goods[1], GREEDY), return_exceptions=True)

    first, error, second = llm._call(with_undecodable())
    assert isinstance(error, ValueError) and "cannot decode image" in str(error)
    assert [first.token_ids, second.token_ids] == expected
    assert llm.stats().kv_blocks_used == 0
    assert llm._call(engine.stats()).num_requests == 0


def test_request_timings_are_collected_only_when_asked(llms) -> None:
    """A request streamed with collect_timings=True gets, on its first token's delta, intervals that
    are non-negative and add up to the time from its arrival to that delta reaching the engine core,
    with a vision encoder call among them; without it, nothing is collected."""
    import time

    from streamvlm.engine.request_timing import INTERVALS

    llm = llms("qwen2_5_vl")
    engine = llm.engine
    messages = conversation([random_image(21, (64, 56))], "What is in the image?")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def first_delta(collect: bool) -> tuple[Any, Any, float, float]:
        start = time.monotonic()
        first, received = None, 0.0
        async for delta in engine.stream(messages, params, collect_timings=collect):
            if first is None:
                first, received = delta, time.monotonic()
        return first, delta, start, received

    first, last, start, received = llm._call(first_delta(True))
    timings = first.timings
    assert timings is not None and last.timings is None
    intervals = timings.intervals()
    assert list(intervals) == list(INTERVALS)
    assert all(value >= 0 for value in intervals.values()), intervals
    assert timings.clock_shared
    assert start <= timings.arrival <= timings.delivered <= received
    assert sum(intervals.values()) == pytest.approx(timings.ttft, abs=1e-6)
    assert timings.encode > 0 and timings.num_prefill_steps >= 1

    first, last, _, _ = llm._call(first_delta(False))
    assert first.timings is None and last.timings is None
    [output] = llm.chat(messages, params)
    assert output.timings is None


@pytest.mark.parametrize("name", NAMES)
def test_worker_makes_the_pixel_values_of_the_core_to_the_bit(name: str, llms) -> None:
    """An image crosses to the worker resized but still uint8; the worker's rescale, normalization
    and layout give exactly the pixel values of the core's numpy preprocessing, and the item keeps
    the hash of the image's content."""
    from workers.image_pixels import as_pixels
    from workers.multimodal import MultiModalInput

    llm = llms(name)
    preparer = llm.engine.processor.multimodal
    image = random_image(31, (90, 61))
    prepared = llm._call(llm.engine.prepare_prompt(conversation([image])))
    [item] = prepared.mm_items
    assert item.source == "image_uint8" and item.data.dtype == "uint8"
    expected = preparer.image_processor.preprocess(image)
    assert len(item.data.data) * 4 <= expected.pixel_values.nbytes
    pixels = as_pixels(MultiModalInput.from_item(item), torch.device("cpu"))
    assert pixels.source == "pixels" and pixels.hash == item.hash
    assert pixels.data.dtype == torch.float32
    assert torch.equal(pixels.data, torch.from_numpy(expected.pixel_values))
    assert pixels.num_tokens == expected.num_tokens
    if expected.grid_thw is not None:
        assert tuple(item.grid_thw) == expected.grid_thw
