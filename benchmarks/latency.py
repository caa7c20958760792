"""Batch-1 decode latency: ms per output token of one request, random weights of a real
model's shapes (default Qwen3-8B, bfloat16), any tensor-parallel size.

The decode time is the whole request's time less a 1-token request's (prefill and start-up of
the request), divided by the remaining tokens.

    python benchmarks/latency.py --shape qwen3-8b --tensor-parallel-size 2 --json results/lat.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import shape_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json")
    args = parser.parse_args()

    from streamvlm import LLM, SamplingParams

    prompt = {"prompt_token_ids": list(range(1000, 1000 + args.prompt_len))}
    with LLM(shape_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
             device=args.device, dtype=args.dtype, max_model_len=4096, max_num_seqs=8,
             num_kv_blocks=1024, enable_prefix_caching=False,
             tensor_parallel_size=args.tensor_parallel_size) as llm:
        def timed(n: int) -> float:
            start = time.perf_counter()
            llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - start

        timed(8)   # warm-up
        first = min(timed(1) for _ in range(args.repeats))
        full = min(timed(args.output_len) for _ in range(args.repeats))
    ms_per_token = 1000 * (full - first) / (args.output_len - 1)
    result = {"shape": args.shape, "tensor_parallel_size": args.tensor_parallel_size,
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "first_token_s": round(first, 4), "ms_per_token": round(ms_per_token, 3)}
    print(f"{'shape':>10} {'tp':>3} {'first tok s':>12} {'ms/token':>9}")
    print(f"{args.shape:>10} {args.tensor_parallel_size:>3} {first:>12.4f} {ms_per_token:>9.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
