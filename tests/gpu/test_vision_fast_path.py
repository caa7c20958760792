"""The vision towers' GPU path (variable-length flash attention over windows and frames, the
fused rotary, the packed MLP, the fused norms; bfloat16) against their torch path (padded SDPA,
unfused ops; float32 on the CPU), on the same random weights and images of several sizes in one
batch, so that windows and frames differ in length."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Real widths (Qwen2.5-VL-3B's tower, Qwen3-VL-2B's), a few blocks.
QWEN2_5_VL = dict(depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                  fullatt_block_indexes=[1, 3], hidden_act="silu")
QWEN3_VL = dict(depth=4, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                deepstack_visual_indexes=[1, 2], hidden_act="gelu_pytorch_tanh")


def _randomize(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    for name, param in module.named_parameters():
        with torch.no_grad():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.02)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).norm() / want.norm()).item()


def _compare(reference_tower, grids: list[tuple[int, int, int]]) -> None:
    fast_tower = copy.deepcopy(reference_tower).to("cuda", torch.bfloat16)
    from workers.loader import pack_weights_for_device

    pack_weights_for_device(fast_tower)
    width = reference_tower.patch_embed.proj.weight[0].numel()
    torch.manual_seed(1)
    patches = torch.randn(sum(t * h * w for t, h, w in grids), width)
    with torch.inference_mode():
        want = reference_tower(patches, grids)
        got = fast_tower(patches.to("cuda", torch.bfloat16), grids)
    assert got.shape == want.shape
    # bfloat16 end to end through four blocks: about 1% of the output's norm.
    assert _relative_error(got, want) < 3e-2


def test_qwen2_5_vl_tower_windows_and_full_attention():
    from workers.models.qwen2_5_vl import VisionArgs, VisionTransformer

    tower = VisionTransformer(VisionArgs.from_hf_config(QWEN2_5_VL)).float().eval()
    _randomize(tower)
    _compare(tower, [(1, 46, 46), (1, 20, 34), (1, 8, 8)])   # 640x640, 280x476, 112x112 images


def test_qwen3_vl_tower_frames_of_several_sizes():
    from workers.models.qwen3_vl import VisionSettings, VisionTower

    tower = VisionTower(VisionSettings(QWEN3_VL)).float().eval()
    _randomize(tower)
    _compare(tower, [(1, 40, 40), (1, 16, 30), (1, 8, 8)])


def test_varlen_attention_matches_padded_sdpa():
    """The attention alone, bfloat16 on CUDA both ways: within bfloat16 rounding."""
    from workers.models.vision_common import (
        SegmentPlan,
        padded_segment_attention,
        segment_attention,
        varlen_attention_applies,
    )

    torch.manual_seed(2)
    lengths = [64, 48, 36, 2116, 5]
    n = sum(lengths)
    q, k, v = (torch.randn(n, 16, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = SegmentPlan(lengths, torch.device("cuda"))
    assert varlen_attention_applies(q)
    got = segment_attention(q, k, v, plan, 80 ** -0.5)
    want = padded_segment_attention(q.float(), k.float(), v.float(), plan.padded, 80 ** -0.5)
    assert _relative_error(got, want.cpu()) < 1e-2
