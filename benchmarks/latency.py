"""Batch-1 decode latency: ms per output token of one request, random weights of a real
model's shapes (default Qwen3-8B, bfloat16), any tensor-parallel size, and memory-bandwidth
utilisation against the HBM bandwidth measured in the same run.

The decode time is the whole request's time less a 1-token request's (prefill and start-up of
the request), divided by the remaining tokens. Bytes read per step are every weight a decode
step reads (all but the token-embedding table, of which it reads one row) plus the KV cache of
the mean context, per GPU; the HBM bandwidth is a large device-to-device copy (read + write).

On the GPU machine:
    python benchmarks/latency.py --shape qwen3-8b --json results/latency.json
    python benchmarks/latency.py --shape qwen3-8b --enforce-eager          # without CUDA graphs
    python benchmarks/latency.py --shape qwen3-8b --tensor-parallel-size 2
    STREAMVLM_DISABLE_PDL=1 python benchmarks/latency.py   # kernels without programmatic dependent launch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ASYNC_SCHEDULING, write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402


def hbm_bandwidth(device: str = "cuda", gib: float = 4.0, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    import torch

    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * repeats / seconds


def decode_bytes_per_step(cfg: dict, context: float, tp: int, itemsize: int = 2) -> float:
    """Bytes one rank reads in a batch-1 decode step: weights (no embedding table) and KV."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    qkv = h * (heads + 2 * kv_heads) * head_dim
    o = heads * head_dim * h
    mlp = 3 * h * inter
    norms = 2 * h + (2 * head_dim if cfg.get("model_type") == "qwen3" else 0)
    weights = layers * ((qkv + o + mlp) / tp + norms) + h + vocab * h / tp   # the LM head
    kv_per_token = 2 * layers * max(1, kv_heads // tp) * head_dim
    return (weights + kv_per_token * context) * itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="queue step N+1 before step N's tokens are back (auto: on for CUDA, TP 1)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from streamvlm import LLM, SamplingParams

    bandwidth = hbm_bandwidth() if torch.cuda.is_available() and args.device != "cpu" else None
    prompt = {"prompt_token_ids": list(range(1000, 1000 + args.prompt_len))}
    with LLM(shape_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
             device=args.device, dtype=args.dtype, max_model_len=4096, max_num_seqs=8,
             num_kv_blocks=1024, enable_prefix_caching=False,
             attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
             async_scheduling=ASYNC_SCHEDULING[args.async_scheduling],
             tensor_parallel_size=args.tensor_parallel_size) as llm:
        def timed(n: int) -> float:
            start = time.perf_counter()
            llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - start

        timed(8)   # warm-up
        first = min(timed(1) for _ in range(args.repeats))
        full = min(timed(args.output_len) for _ in range(args.repeats))
        device = llm.engine.groups[0].ready.device
    step_s = (full - first) / (args.output_len - 1)
    context = args.prompt_len + args.output_len / 2
    step_bytes = decode_bytes_per_step(SHAPES[args.shape], context, args.tensor_parallel_size)
    utilisation = step_bytes / step_s / bandwidth if bandwidth else None
    result = {"shape": args.shape, "device": device, "tensor_parallel_size": args.tensor_parallel_size,
              "cuda_graphs": not args.enforce_eager, "async_scheduling": args.async_scheduling, "attention_backend": args.attention_backend,
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "first_token_s": round(first, 4), "ms_per_token": round(1000 * step_s, 3),
              "bytes_per_step_per_gpu": int(step_bytes),
              "hbm_bandwidth_gb_s": round(bandwidth / 1e9, 1) if bandwidth else None,
              "bandwidth_utilisation": round(utilisation, 3) if utilisation else None}
    print(f"{'shape':>10} {'tp':>3} {'graphs':>6} {'first tok s':>12} {'ms/token':>9} {'GB/step':>8} "
          f"{'HBM GB/s':>9} {'util':>6}")
    print(f"{args.shape:>10} {args.tensor_parallel_size:>3} {str(not args.enforce_eager):>6} {first:>12.4f} "
          f"{1000 * step_s:>9.3f} {step_bytes / 1e9:>8.2f} "
          f"{(bandwidth or 0) / 1e9:>9.1f} {100 * (utilisation or 0):>5.1f}%")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
