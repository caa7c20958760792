"""Vision tower time: the encoder of a VLM shape (random weights) on a batch of same-size
images, milliseconds per call (CUDA events, after warm-up), with the attention the worker picks
(variable-length flash attention on CUDA) and, with --compare-padded, the padded SDPA path
beside it. --profile prints the top kernels of one call.

On the GPU machine:
    python benchmarks/vision_tower.py --images 1,4,16 --image-size 640 --compare-padded --json results/vision_tower.json
    python benchmarks/vision_tower.py --shape qwen3-vl-2b --images 1,16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import milliseconds_per_call, write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_model(shape: str, device: str, dtype):
    import torch

    from workers.models.registry import model_class

    config = json.loads((Path(shape_folder(shape)) / "config.json").read_text())
    with torch.device(device):
        model = model_class(config)(config, max_model_len=4096)
    from workers.loader import init_dummy_weights, pack_weights_for_device

    model.to(dtype)
    init_dummy_weights(model, seed=0)
    pack_weights_for_device(model)
    return model.eval()


def pixel_items(model, count: int, size: int, device: str):
    """count size x size images as the worker's "pixels" items (random values, the grid the Qwen
    processors give a square image of that size)."""
    import torch

    from workers.multimodal import MultiModalInput

    settings = getattr(model, "vision_args", None) or model.model.visual.settings
    patch, merge = settings.patch_size, settings.spatial_merge_size
    side = max(merge, round(size / (patch * merge)) * merge)          # patches per side
    width = settings.in_channels * settings.temporal_patch_size * patch * patch
    return [MultiModalInput(hash=f"image-{i}", offset=0, num_tokens=side * side // merge ** 2, source="pixels",
                            modality="image", data=torch.randn(side * side, width, device=device),
                            grid_thw=(1, side, side))
            for i in range(count)]


def time_encode(model, items, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        return milliseconds_per_call(lambda: model.encode(items), repeats)


def profile_encode(model, items) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.encode(items)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def host_profile_encode(model, items) -> str:
    import cProfile
    import io
    import pstats

    import torch

    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        model.encode(items)
        torch.cuda.synchronize()
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--images", type=int_list, default=[1, 4, 16], help="images per call, e.g. 1,4,16")
    parser.add_argument("--image-size", type=int_list, default=[640])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compare-padded", action="store_true",
                        help="also time the padded SDPA attention (the CPU path) on the same batch")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one call")
    parser.add_argument("--host-profile", action="store_true",
                        help="print the top Python functions (cProfile, by own time) of one call")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from workers.models import vision_common

    if SHAPES[args.shape].get("vision_config") is None:
        raise SystemExit(f"{args.shape} has no vision tower")
    model = build_model(args.shape, "cuda", torch.bfloat16)
    varlen = vision_common._varlen_attention
    rows = []
    print(f"{'size':>5} {'images':>6} {'tokens':>7} {'varlen ms':>10} {'padded ms':>10}")
    for size in args.image_size:
        for count in args.images:
            items = pixel_items(model, count, size, "cuda")
            row = {"shape": args.shape, "image_size": size, "images": count,
                   "tokens": sum(item.num_tokens for item in items),
                   "varlen_available": varlen is not None,
                   "ms": round(time_encode(model, items, args.repeats), 3)}
            if args.compare_padded:
                vision_common._varlen_attention = None
                try:
                    row["padded_ms"] = round(time_encode(model, items, args.repeats), 3)
                finally:
                    vision_common._varlen_attention = varlen
            rows.append(row)
            print(f"{size:>5} {count:>6} {row['tokens']:>7} {row['ms']:>10} {row.get('padded_ms', '-')!s:>10}")
            if args.profile:
                print(profile_encode(model, items))
            if args.host_profile:
                print(host_profile_encode(model, items))
    write_json(args.json, {"runs": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
