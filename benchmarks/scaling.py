"""Scaling from one GPU to N on one host (Qwen3-8B shapes, random bfloat16 weights): one call that
measures all three and writes JSON and a plot.

1. Replicas: the throughput workload of throughput.py scaled to the GPU count (256 * N requests
   on N replicas against 256 on one): output tokens/s and the speedup.
2. Tensor parallelism: batch-1 decode ms per token at TP=N against TP=1.
3. Prefill/decode: the mixed load of disaggregated.py (steady chats plus bursts of long prompts)
   on prefill/decode layouts (e.g. 2p6d, 4p4d) against N mixed replicas: chat inter-token latency
   p50 / p99 and chat tokens/s.

On eight GPUs (nvidia-h200-x8):
    python benchmarks/scaling.py --gpus 8 --layouts 2p6d,4p4d --json results/scaling.json --plot results/scaling.png
A quick CPU check of the script itself (tiny numbers):
    python benchmarks/scaling.py --model PATH --device cpu --dtype float32 --gpus 2 --requests-per-gpu 8 --min-len 16 \\
        --max-len 64 --latency-output-len 8 --layouts 1p1d --duration 3 --chats 2 --burst-prompt-len 100 \\
        --max-model-len 512
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.disaggregated import add_mixed_load_args, mixed_load  # noqa: E402
from benchmarks.shapes import shape_folder  # noqa: E402
from benchmarks.throughput import workload  # noqa: E402


def throughput(args: argparse.Namespace, folder: str, replicas: int) -> dict:
    from streamvlm import LLM, SamplingParams

    prompts, lens = workload(args.requests_per_gpu * replicas, args.min_len, args.max_len)
    with LLM(folder, load_format=args.load_format, skip_tokenizer_init=True, device=args.device, dtype=args.dtype,
             max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=args.max_model_len,
             num_replicas=replicas, devices=list(range(replicas)) if args.device != "cpu" else None) as llm:
        llm.generate([{"prompt_token_ids": p} for p in prompts[:replicas]],
                     SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in lens],
                            use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"replicas": replicas, "requests": len(prompts), "output_tokens": tokens, "seconds": round(seconds, 2),
            "output_tokens_per_s": round(tokens / seconds, 1)}


def decode_latency(args: argparse.Namespace, folder: str, tp: int) -> dict:
    from streamvlm import LLM, SamplingParams

    prompt = {"prompt_token_ids": list(range(1000, 1128))}
    with LLM(folder, load_format=args.load_format, skip_tokenizer_init=True, device=args.device, dtype=args.dtype,
             max_model_len=4096, max_num_seqs=8, num_kv_blocks=1024, enable_prefix_caching=False,
             tensor_parallel_size=tp, devices=list(range(tp)) if args.device != "cpu" else None) as llm:
        def timed(n: int) -> float:
            start = time.perf_counter()
            llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - start
        timed(8)
        first = min(timed(1) for _ in range(2))
        full = min(timed(args.latency_output_len) for _ in range(2))
    return {"tensor_parallel_size": tp, "ms_per_token": round(1000 * (full - first) / (args.latency_output_len - 1), 3)}


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = result["replicas"]
    axes[0].bar([f"{r['replicas']} replica(s)" for r in rows], [r["output_tokens_per_s"] for r in rows])
    axes[0].set_title(f"throughput (speedup {result['replica_speedup']}x)")
    axes[0].set_ylabel("output tokens/s")
    rows = result["tensor_parallel"]
    axes[1].bar([f"TP={r['tensor_parallel_size']}" for r in rows], [r["ms_per_token"] for r in rows])
    axes[1].set_title(f"batch-1 decode (speedup {result['tp_speedup']}x)")
    axes[1].set_ylabel("ms per token")
    rows = result["prefill_decode"]
    names = [r["layout"] for r in rows]
    axes[2].bar([n + " p50" for n in names], [r["chat_itl_ms_p50"] or 0 for r in rows])
    axes[2].bar([n + " p99" for n in names], [r["chat_itl_ms_p99"] or 0 for r in rows])
    axes[2].set_title("chat inter-token latency under bursts")
    axes[2].set_ylabel("ms")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--shape", default="qwen3-8b")
    parser.add_argument("--model", help="a checkpoint folder instead of --shape (its own weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests-per-gpu", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--latency-output-len", type=int, default=128)
    parser.add_argument("--layouts", default="2p6d,4p4d", help="prefill/decode layouts; N mixed replicas is added")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: replicas,tp,pd")
    add_mixed_load_args(parser, chats=128, burst_size=16)   # the mixed load of disaggregated.py
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    args.load_format = "auto" if args.model else "dummy"
    folder = args.model or shape_folder(args.shape)
    skip = set(args.skip.split(",")) - {""}
    result: dict = {"shape": args.model or args.shape, "gpus": args.gpus, "device": args.device}

    if "replicas" not in skip:
        result["replicas"] = [throughput(args, folder, 1), throughput(args, folder, args.gpus)]
        one, many = result["replicas"]
        result["replica_speedup"] = round(many["output_tokens_per_s"] / one["output_tokens_per_s"], 2)
        print(f"replicas: 1 -> {one['output_tokens_per_s']} tok/s, {args.gpus} -> {many['output_tokens_per_s']} "
              f"tok/s ({result['replica_speedup']}x; goal 7.5x at 8)")
    if "tp" not in skip:
        result["tensor_parallel"] = [decode_latency(args, folder, 1), decode_latency(args, folder, args.gpus)]
        one, many = result["tensor_parallel"]
        result["tp_speedup"] = round(one["ms_per_token"] / many["ms_per_token"], 2)
        print(f"batch-1 decode: TP=1 {one['ms_per_token']} ms, TP={args.gpus} {many['ms_per_token']} ms "
              f"({result['tp_speedup']}x; goal 4x at 8)")
    if "pd" not in skip:
        layouts = [*args.layouts.split(","), f"{args.gpus}mixed"]
        result["prefill_decode"] = [asyncio.run(mixed_load(args, folder, layout)) for layout in layouts]
        print(f"{'layout':>8} {'chat tok/s':>11} {'ITL p50 ms':>11} {'ITL p99 ms':>11}")
        for row in result["prefill_decode"]:
            print(f"{row['layout']:>8} {row['chat_tokens_per_s']:>11} {row['chat_itl_ms_p50']:>11} "
                  f"{row['chat_itl_ms_p99']:>11}")
    write_json(args.json, result)
    if args.plot and {"replicas", "tensor_parallel", "prefill_decode"} <= set(result):
        plot(result, args.plot)


if __name__ == "__main__":
    main()
