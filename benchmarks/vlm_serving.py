"""VLM serving latency: Qwen2.5-VL-3B shapes (random weights, bfloat16), each request one
640x640 image (a different one each: no encoder-cache hits) and 100 text tokens, 128 output
tokens, 200 requests at concurrency 16 through engine.stream. Time to first token and time per
output token (after the first), p50 and p99.

On the GPU machine:
    python benchmarks/vlm_serving.py --json results/vlm_serving.json
A quick CPU check (tiny numbers):
    python benchmarks/vlm_serving.py --num-requests 2 --concurrency 2 --output-len 4 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def random_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


async def run(args: argparse.Namespace) -> dict:
    from streamvlm import AsyncEngine, EngineConfig, SamplingParams

    cfg = SHAPES[args.shape]
    config = EngineConfig(model=shape_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
                          device=args.device, dtype=args.dtype, max_model_len=4096, max_num_seqs=64,
                          enable_prefix_caching=False)
    vision_start, image_token, vision_end = (cfg["vision_start_token_id"], cfg["image_token_id"],
                                             cfg["vision_end_token_id"])
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    gate = asyncio.Semaphore(args.concurrency)
    ttfts: list[float] = []
    tpots: list[float] = []

    async def one(engine: AsyncEngine, i: int) -> None:
        text = [1000 + (i * 7 + j) % 5000 for j in range(args.text_tokens)]
        prompt = {"prompt_token_ids": [vision_start, image_token, vision_end, *text],
                  "images": [random_image(i, args.image_size)]}
        async with gate:
            start = time.perf_counter()
            first = None
            count = 0
            async for delta in engine.stream(prompt, params):
                if delta.token_ids and first is None:
                    first = time.perf_counter()
                count += len(delta.token_ids)
            end = time.perf_counter()
        ttfts.append(first - start)
        if count > 1:
            tpots.append((end - first) / (count - 1))

    async with AsyncEngine(config) as engine:
        await asyncio.gather(*(one(engine, 10**6 + i) for i in range(min(4, args.concurrency))))   # warm-up
        ttfts.clear()
        tpots.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(engine, i) for i in range(args.num_requests)))
        elapsed = time.perf_counter() - start
        stats = await engine.stats()
        device = engine.groups[0].ready.device
    return {"shape": args.shape, "device": device, "requests": args.num_requests, "concurrency": args.concurrency,
            "image_size": args.image_size, "text_tokens": args.text_tokens, "output_len": args.output_len,
            "seconds": round(elapsed, 2), "encoded_images": stats.num_encoded_items,
            "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
            "ttft_ms_p99": round(1000 * percentile(ttfts, 99), 1),
            "tpot_ms_p50": round(1000 * statistics.median(tpots), 2),
            "tpot_ms_p99": round(1000 * percentile(tpots, 99), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"{'requests':>8} {'conc':>5} {'seconds':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")
    print(f"{result['requests']:>8} {result['concurrency']:>5} {result['seconds']:>8} {result['ttft_ms_p50']:>7} ms "
          f"{result['ttft_ms_p99']:>6} ms {result['tpot_ms_p50']:>6} ms {result['tpot_ms_p99']:>6} ms")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
