"""The engine core's own cost on CPU: tokens/s into concurrent engine.stream consumers.

Two modes on the embedded SmolLM2 (its real tokenizer, so detokenization is real work):
  model  the worker runs the model (what a CPU deployment delivers);
  noop   the worker samples random tokens without a forward pass (skip_model_forward), so the
         numbers show the ceiling of the engine core, ZeroMQ, msgspec and detokenization.
Engine-core CPU time per step is this process's CPU time (the worker is another process)
divided by the step outputs it received.

    python benchmarks/frontend.py                      # both modes, 1 / 64 / 256 streams
    python benchmarks/frontend.py --modes noop --json results/frontend.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def run_case(engine, streams: int, max_tokens: int, prompt_len: int) -> dict:
    from streamvlm import SamplingParams

    rng = random.Random(streams)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(prompt_len)]}
               for _ in range(streams)]
    received = 0

    async def consume(prompt) -> None:
        nonlocal received
        async for delta in engine.stream(prompt, params):
            received += len(delta.token_ids)

    steps_before = (await engine.stats()).num_steps
    cpu_before, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(consume(p) for p in prompts))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    steps = (await engine.stats()).num_steps - steps_before
    return {"streams": streams, "tokens": received, "seconds": round(elapsed, 3),
            "tokens_per_s": round(received / elapsed), "steps": steps,
            "core_cpu_ms_per_step": round(1000 * cpu / max(steps, 1), 3)}


async def run_mode(mode: str, stream_counts: list[int], max_tokens: int,
                   prompt_len: int) -> list[dict]:
    from streamvlm import AsyncEngine, EngineConfig

    config = EngineConfig(device="cpu", max_model_len=2048, max_num_seqs=max(stream_counts),
                          max_num_batched_tokens=8192, skip_model_forward=mode == "noop")
    results = []
    async with AsyncEngine(config) as engine:
        await run_case(engine, 4, 8, prompt_len)   # warm-up
        for streams in stream_counts:
            row = await run_case(engine, streams, max_tokens, prompt_len)
            row["mode"] = mode
            results.append(row)
            print(f"{mode:>6} {row['streams']:>8} {row['tokens']:>9} {row['seconds']:>8.2f} "
                  f"{row['tokens_per_s']:>10} {row['steps']:>7} "
                  f"{row['core_cpu_ms_per_step']:>10.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="model,noop")
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--noop-tokens", type=int, default=1024, help="output tokens per stream")
    parser.add_argument("--model-tokens", type=int, default=32, help="output tokens per stream")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    from streamvlm.engine.loop import new_event_loop

    stream_counts = [int(n) for n in args.streams.split(",")]
    print(f"{'mode':>6} {'streams':>8} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} "
          f"{'steps':>7} {'cpu ms/step':>10}")
    rows: list[dict] = []
    loop = new_event_loop()
    for mode in args.modes.split(","):
        tokens = args.noop_tokens if mode == "noop" else args.model_tokens
        rows += loop.run_until_complete(run_mode(mode, stream_counts, tokens, args.prompt_len))
    loop.close()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
