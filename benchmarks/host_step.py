"""The worker's host work per decode step, without a model: scheduling, building the step plan, and
filling the CUDA-graph staging buffer, for a batch of sequences of random lengths. These run on the
CPU while (with async scheduling) the device runs the step before, so they bound how short a step can
be. Runs anywhere; no GPU needed.

    python benchmarks/host_step.py [--batch 256] [--min-len 200] [--max-len 1800] [--json results/host_step.json]
    python benchmarks/host_step.py --default-gc    # the collector's defaults, not the worker's policy
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=200)
    parser.add_argument("--max-len", type=int, default=1800)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--default-gc", action="store_true",
                        help="leave the collector as it is, not as a worker process sets it once built")
    parser.add_argument("--json")
    args = parser.parse_args()

    import numpy as np

    import streamvlm  # noqa: F401  (the package first: workers import its protocol)
    from streamvlm.contract.sampling import SamplingParams
    from workers.cuda_graphs import fill_staging
    from workers.heap import settle_after_build
    from workers.kv_cache import BlockPool
    from workers.model_runner import build_step_plan
    from workers.scheduler import Scheduler
    from workers.sequence import Sequence

    random.seed(0)
    bs = args.block_size
    blocks_per_seq = -(-(args.max_len + args.steps) // bs)
    pool = BlockPool(args.batch * blocks_per_seq, bs, enable_prefix_caching=True)
    scheduler = Scheduler(pool, args.batch, max_num_batched_tokens=1 << 20)
    for i in range(args.batch):
        prompt = [random.randint(0, 9999) for _ in range(random.randint(args.min_len, args.max_len))]
        scheduler.add(Sequence(str(i), prompt, SamplingParams(temperature=0.6), [], i))

    def advance(chunks) -> None:   # what the worker does with a step's chunks, less the model
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            pool.register_full_blocks(chunk.seq)
            if chunk.samples:
                chunk.seq.append_token(7, None)

    advance(scheduler.schedule().chunks)   # the prompts: one big prefill step
    if not args.default_gc:
        settle_after_build()   # as a worker process does once built
    host = np.zeros(8 * args.batch + args.batch * blocks_per_seq, dtype=np.int64)
    totals = {"schedule": 0.0, "plan": 0.0, "staging": 0.0, "bookkeeping": 0.0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        chunks = scheduler.schedule().chunks
        t1 = time.perf_counter()
        plan = build_step_plan(chunks, bs, uses_mrope=False)
        t2 = time.perf_counter()
        fill_staging(host, plan, args.batch, position_rows=1)
        t3 = time.perf_counter()
        advance(chunks)
        t4 = time.perf_counter()
        for name, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[name] += seconds
    result = {"batch": args.batch, "block_size": bs, "steps": args.steps,
              **{f"{name}_ms": round(1000 * seconds / args.steps, 4) for name, seconds in totals.items()}}
    print(f"{'batch':>6} " + " ".join(f"{name + ' ms':>15}" for name in totals))
    print(f"{args.batch:>6} " + " ".join(f"{result[name + '_ms']:>15.3f}" for name in totals))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
