"""CUDA graphs of the vision towers (workers/encoder_graphs.py): a batch of image grids runs eagerly
the first time, is captured the second and replayed after; every call gives the eager output, and
the output of one call survives the next replay (the encoder cache keeps it)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_vision_fast_path import QWEN2_5_VL, QWEN3_VL, _randomize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tower(name: str):
    from workers.loader import pack_weights_for_device

    if name == "qwen2.5-vl":
        from workers.models.qwen2_5_vl import VisionArgs, VisionTransformer

        tower = VisionTransformer(VisionArgs.from_hf_config(QWEN2_5_VL))
    else:
        from workers.models.qwen3_vl import VisionSettings, VisionTower

        tower = VisionTower(VisionSettings(QWEN3_VL))
    _randomize(tower)
    tower = tower.to("cuda", torch.bfloat16).eval()
    pack_weights_for_device(tower)
    return tower


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _patches(tower, grids, seed: int) -> torch.Tensor:
    width = tower.patch_embed.proj.weight[0].numel()
    generator = torch.Generator().manual_seed(seed)
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, width, generator=generator).to("cuda", torch.bfloat16)


@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl"])
def test_graph_replays_give_the_eager_output(name):
    from workers.encoder_graphs import EncoderGraphs

    tower = _tower(name)
    device = torch.device("cuda")
    graphs = EncoderGraphs(tower.run, lambda key: tower.prepare(list(key), device), max_rows=100_000)
    grids = ((1, 46, 46), (1, 20, 34), (1, 8, 8))
    outputs = []
    with torch.inference_mode():
        for seed in range(4):
            patches = _patches(tower, grids, seed)
            want = tower(patches, list(grids))
            got = graphs(patches, grids)
            outputs.append((got, want))
    assert len(graphs.graphs) == 1 and graphs.replays == 3   # eager, then captured and replayed
    for got, want in outputs:   # earlier outputs were not overwritten by later replays
        assert _relative_error(got, want) < 1e-3


def test_graphs_are_bounded_and_large_batches_stay_eager():
    from workers.encoder_graphs import EncoderGraphs

    tower = _tower("qwen2.5-vl")
    device = torch.device("cuda")
    graphs = EncoderGraphs(tower.run, lambda key: tower.prepare(list(key), device), max_rows=1024, max_graphs=2)
    shapes = [((1, 8, 8),), ((1, 16, 16),), ((1, 8, 16),), ((1, 40, 40),)]   # the last has 1,600 rows
    with torch.inference_mode():
        for _ in range(3):
            for grids in shapes:
                patches = _patches(tower, grids, 0)
                assert _relative_error(graphs(patches, grids), tower(patches, list(grids))) < 1e-3
    assert len(graphs.graphs) == 2
    assert ((1, 40, 40),) not in graphs.graphs


def test_llava_encodes_from_graphs_per_image_count(tmp_path):
    """LLaVA (CLIP tower and projector): graphs per number of images give the eager embeddings."""
    from streamvlm.contract.model_source import resolve_model
    from tests.checkpoints_llava import build_llava_checkpoint
    from workers.loader import load_model
    from workers.multimodal import MultiModalInput

    path = build_llava_checkpoint(tmp_path / "llava")
    model = load_model(resolve_model(str(path)), "auto", 256, torch.device("cuda"), torch.bfloat16)
    vision = model.llava.vision
    eager = []
    with torch.inference_mode():
        batches = []
        for seed in range(3):
            generator = torch.Generator().manual_seed(seed)
            batches.append([MultiModalInput(f"{seed}-{i}", 0, model.tokens_per_image, "pixels", "image",
                                            torch.randn(vision.num_channels, vision.image_size, vision.image_size,
                                                        generator=generator))
                            for i in range(2)])
        eager = [model.encode(items) for items in batches]
        model.use_encoder_graphs(64 * model.tokens_per_image)
        graphed = [model.encode(items) for items in batches]
    assert model.vision_graphs.replays == 2
    for got, want in zip(graphed, eager):
        for a, b in zip(got, want):
            assert _relative_error(a, b) < 1e-3
