"""VLM serving latency: Qwen2.5-VL-3B shapes (random weights, bfloat16), each request one
640x640 image (a different one each: no encoder-cache hits) and 100 text tokens, 128 output
tokens, 200 requests at concurrency 16 through engine.stream. Time to first token and time per
output token (after the first), p50 and p99, and where each request's time to first token went
(engine.stream(collect_timings=True)): p50 and p99 of each interval, in order.

--concurrency and --image-size take comma-separated lists: every pair is run, on one engine.

On the GPU machine:
    python benchmarks/vlm_serving.py --json results/vlm_serving.json
    python benchmarks/vlm_serving.py --concurrency 1,4,16,64 --image-size 336,640,1280 --json results/vlm_sweep.json
The host side alone, on any machine (no model forward, no vision encoder):
    python benchmarks/vlm_serving.py --device cpu --dtype float32 --skip-model-forward --output-len 4 \\
        --num-requests 64 --concurrency 1,16,64 --image-size 336,640,1280
A quick CPU check (tiny numbers):
    python benchmarks/vlm_serving.py --num-requests 2 --concurrency 2 --output-len 4 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402


# Where the time to first token went: the engine's intervals (RequestTimings), then the hop from
# the engine core to the consumer of the stream.
BREAKDOWN = ("preprocess", "core_wait", "to_worker", "worker_prepare", "step_wait", "encode", "prefill",
             "way_back", "to_consumer")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def random_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


async def run_one(engine, args: argparse.Namespace, concurrency: int, image_size: int, seed: int) -> dict:
    from streamvlm import SamplingParams

    cfg = SHAPES[args.shape]
    vision_start, image_token, vision_end = (cfg["vision_start_token_id"], cfg["image_token_id"],
                                             cfg["vision_end_token_id"])
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tpots: list[float] = []
    breakdown: dict[str, list[float]] = {name: [] for name in BREAKDOWN}
    arrivals: list[tuple[float, float, float]] = []   # (start, preprocess, ttft) of each request

    async def one(i: int, image) -> None:
        text = [1000 + (i * 7 + j) % 5000 for j in range(args.text_tokens)]
        prompt = {"prompt_token_ids": [vision_start, image_token, vision_end, *text], "images": [image]}
        async with gate:
            start = time.monotonic()
            first = None
            timings = None
            count = 0
            async for delta in engine.stream(prompt, params, collect_timings=True):
                if delta.token_ids and first is None:
                    first = time.monotonic()
                timings = timings or delta.timings
                count += len(delta.token_ids)
            end = time.monotonic()
        ttfts.append(first - start)
        arrivals.append((start, timings.preprocess if timings else 0.0, first - start))
        if count > 1:
            tpots.append((end - first) / (count - 1))
        if timings is not None:
            for name, seconds in timings.intervals().items():
                breakdown[name].append(seconds)
            breakdown["to_consumer"].append(first - timings.delivered)

    # Made before the clock starts: making them takes the event loop some 5 ms each.
    warm_up = [random_image(seed + 10**6 + i, image_size) for i in range(min(4, concurrency))]
    images = [random_image(seed + i, image_size) for i in range(args.num_requests)]
    await asyncio.gather(*(one(seed + 10**6 + i, image) for i, image in enumerate(warm_up)))
    ttfts.clear()
    tpots.clear()
    arrivals.clear()
    for values in breakdown.values():
        values.clear()
    before = await engine.stats()
    start, window_start = time.perf_counter(), time.monotonic()
    await asyncio.gather(*(one(seed + i, image) for i, image in enumerate(images)))
    elapsed = time.perf_counter() - start
    window = (window_start, time.monotonic())
    after = await engine.stats()
    return {"shape": args.shape, "device": engine.groups[0].ready.device, "requests": args.num_requests,
            "concurrency": concurrency, "image_size": image_size, "text_tokens": args.text_tokens,
            "output_len": args.output_len, "skip_model_forward": args.skip_model_forward, "seconds": round(elapsed, 2),
            "encoded_images": after.num_encoded_items - before.num_encoded_items,
            "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
            "ttft_ms_p99": round(1000 * percentile(ttfts, 99), 1),
            "tpot_ms_p50": round(1000 * statistics.median(tpots), 2) if tpots else None,
            "tpot_ms_p99": round(1000 * percentile(tpots, 99), 2) if tpots else None,
            "ttft_breakdown_ms": {name: {"p50": ms(statistics.median(values)), "p99": ms(percentile(values, 99))}
                                  for name, values in breakdown.items() if values},
            # The first requests meet an idle engine all at once: their share of the tail.
            "first_requests_ms": [{"start": ms(begin - window_start), "preprocess": ms(pre), "ttft": ms(ttft)}
                                  for begin, pre, ttft in sorted(arrivals)[:2 * concurrency]],
            **({"steps": step_summary(args.step_trace, window)} if args.step_trace else {})}


def step_summary(prefix: str, window: tuple[float, float]) -> dict[str, dict]:
    """The worker's steps inside the window (STREAMVLM_STEP_TRACE lines), by kind: decode only,
    with prefill tokens, with images encoded; count and p50/p99 host milliseconds of each."""
    import glob
    import json

    kinds: dict[str, list[float]] = {"decode": [], "prefill": [], "encode": []}
    for path in glob.glob(f"{prefix}.*.jsonl"):
        with open(path) as f:
            for line in f:
                started, ended, tokens, running, encoded, _ = json.loads(line)
                if not window[0] <= started <= window[1]:
                    continue
                kind = "encode" if encoded else "prefill" if tokens > running else "decode"
                kinds[kind].append(ended - started)
    return {kind: {"steps": len(values), "p50_ms": ms(statistics.median(values)),
                   "p99_ms": ms(percentile(values, 99)), "total_s": round(sum(values), 2)}
            for kind, values in kinds.items() if values}


async def run(args: argparse.Namespace) -> list[dict]:
    from streamvlm import AsyncEngine, EngineConfig

    if args.step_trace:
        os.environ["STREAMVLM_STEP_TRACE"] = args.step_trace   # the worker processes inherit it

    config = EngineConfig(model=shape_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
                          device=args.device, dtype=args.dtype, max_model_len=4096, max_num_seqs=64,
                          **({"max_num_batched_tokens": args.max_num_batched_tokens}
                             if args.max_num_batched_tokens else {}),
                          **({"max_num_encoder_tokens": args.max_num_encoder_tokens}
                             if args.max_num_encoder_tokens else {}),
                          enable_prefix_caching=False, skip_model_forward=args.skip_model_forward)
    results = []
    async with AsyncEngine(config) as engine:
        for image_size in args.image_size:
            for concurrency in args.concurrency:
                # Fresh images for every run: no encoder-cache hits across runs either.
                seed = 10**7 * len(results)
                results.append(await run_one(engine, args, concurrency, image_size, seed))
                print_run(results[-1])
    return results


def print_run(result: dict) -> None:
    print(f"\n{'requests':>8} {'conc':>5} {'image':>6} {'seconds':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}")
    print(f"{result['requests']:>8} {result['concurrency']:>5} {result['image_size']:>6} {result['seconds']:>8} "
          f"{result['ttft_ms_p50']:>7} ms {result['ttft_ms_p99']:>6} ms {result['tpot_ms_p50']!s:>6} ms "
          f"{result['tpot_ms_p99']!s:>6} ms")
    print(f"  {'TTFT breakdown':<16} {'p50 ms':>9} {'p99 ms':>9}")
    for name, values in result["ttft_breakdown_ms"].items():
        print(f"  {name:<16} {values['p50']:>9} {values['p99']:>9}")
    if "steps" in result:
        print(f"  {'worker steps':<16} {'count':>9} {'p50 ms':>9} {'p99 ms':>9} {'total s':>9}")
        for kind, values in result["steps"].items():
            print(f"  {kind:<16} {values['steps']:>9} {values['p50_ms']:>9} {values['p99_ms']:>9} "
                  f"{values['total_s']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int_list, default=[16], help="one or more, e.g. 1,4,16,64")
    parser.add_argument("--image-size", type=int_list, default=[640], help="one or more, e.g. 336,640,1280")
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-model-forward", action="store_true",
                        help="the worker samples random tokens without running the model or its vision "
                             "encoder: the host side's share of the time alone")
    parser.add_argument("--max-num-batched-tokens", type=int, help="the engine's default when not given")
    parser.add_argument("--max-num-encoder-tokens", type=int, help="the engine's default when not given")
    parser.add_argument("--step-trace", metavar="PREFIX",
                        help="the worker writes its steps to PREFIX.<pid>.jsonl; each run's steps are summarised")
    parser.add_argument("--json")
    args = parser.parse_args()
    write_json(args.json, {"runs": asyncio.run(run(args))})


if __name__ == "__main__":
    main()
