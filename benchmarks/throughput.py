"""Offline throughput: many requests of random lengths through LLM.generate, output tokens/s.

The workload is nano-vllm's: 256 requests, prompt and output lengths uniform in [100, 1024]
(random.seed(0)), prompt tokens randint(0, 10000), ignore_eos. Random weights of a real model's
shapes (speed does not depend on the values).

On a GPU:          python benchmarks/throughput.py --shape qwen3-0.6b --json results/throughput.json
A quick CPU check: python benchmarks/throughput.py --num-requests 4 --max-len 128 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import shape_folder  # noqa: E402


def workload(num_requests: int, min_len: int, max_len: int) -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(min_len, max_len))]
               for _ in range(num_requests)]
    output_lens = [random.randint(min_len, max_len) for _ in range(num_requests)]
    return prompts, output_lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help="model shape (benchmarks/shapes.py)")
    parser.add_argument("--model", help="a checkpoint folder instead of --shape")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from streamvlm import LLM, SamplingParams

    folder = args.model or shape_folder(args.shape)
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, device=args.device,
              dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, num_replicas=args.num_replicas)
    prompts, output_lens = workload(args.num_requests, args.min_len, args.max_len)
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate(requests[:2], [SamplingParams(max_tokens=8, ignore_eos=True)] * 2,
                 use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.token_ids) for o in outputs)
    result = {"model": args.model or args.shape, "tensor_parallel_size": args.tensor_parallel_size,
              "num_replicas": args.num_replicas, "device": llm.engine.groups[0].ready.device,
              "dtype": llm.config.dtype, "requests": len(requests),
              "prompt_tokens": sum(map(len, prompts)), "output_tokens": output_tokens,
              "seconds": round(elapsed, 3),
              "output_tokens_per_s": round(output_tokens / elapsed, 1)}
    print(f"{'requests':>10} {'output tokens':>14} {'seconds':>9} {'tok/s':>10}")
    print(f"{result['requests']:>10} {output_tokens:>14} {elapsed:>9.2f} "
          f"{result['output_tokens_per_s']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
