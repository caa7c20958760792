"""Offline throughput: many requests of random lengths through LLM.generate, output tokens/s.

The workload is nano-vllm's: 256 requests, prompt and output lengths uniform in [100, 1024]
(random.seed(0)), prompt tokens randint(0, 10000), ignore_eos. Random weights of a real model's
shapes (speed does not depend on the values).

On a GPU:          python benchmarks/throughput.py --shape qwen3-0.6b --json results/throughput.json
Against transformers' continuous batching on the same GPU, same requests, same run:
                   python benchmarks/throughput.py --peer transformers [--peer-requests 64]
A quick CPU check: python benchmarks/throughput.py --num-requests 4 --max-len 128 --device cpu --dtype float32

--peer-requests N gives the peer only the first N requests (transformers is slow enough that the
whole workload takes minutes); the ratio compares output tokens per second either way.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ASYNC_SCHEDULING, add_workload_arguments, write_json  # noqa: E402
from benchmarks.shapes import shape_folder  # noqa: E402


def workload(num_requests: int, min_len: int, max_len: int) -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(min_len, max_len))]
               for _ in range(num_requests)]
    output_lens = [random.randint(min_len, max_len) for _ in range(num_requests)]
    return prompts, output_lens


def transformers_throughput(folder: str, prompts: list[list[int]], output_lens: list[int],
                            dtype: str) -> dict:
    """The same requests through transformers' continuous batching manager (per-request
    max_new_tokens, sampling at temperature 0.6, EOS never stops a request), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    torch_dtype = torch.bfloat16 if dtype in ("auto", "bfloat16") else getattr(torch, dtype)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    generation = GenerationConfig(max_new_tokens=max(output_lens), do_sample=True, temperature=0.6,
                                  eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=generation)
    manager.start()
    try:
        warm = manager.add_request(prompts[0][:16], request_id="warmup", max_new_tokens=8)
        while (r := manager.get_result(timeout=60)) is not None and not (r.request_id == warm and r.is_finished()):
            pass
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        done: dict[str, int] = {}
        while len(done) < len(prompts):
            r = manager.get_result(timeout=120)
            if r is None:
                raise RuntimeError(f"transformers stopped after {len(done)} of {len(prompts)} requests")
            if r.is_finished() and r.request_id.startswith("r"):
                done[r.request_id] = len(r.generated_tokens)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    tokens = sum(done.values())
    return {"engine": "transformers", "requests": len(prompts), "output_tokens": tokens,
            "expected_output_tokens": sum(output_lens), "seconds": round(elapsed, 3),
            "output_tokens_per_s": round(tokens / elapsed, 1)}


def print_profiles(prefix: str, top: int = 30) -> None:
    import glob
    import pstats

    for path in sorted(glob.glob(f"{prefix}.*")):
        print(f"--- worker profile {path} (by own time) ---")
        pstats.Stats(path).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="queue step N+1 before step N's tokens are back (auto: on for CUDA, TP 1)")
    parser.add_argument("--peer", choices=["transformers"], help="also run this engine on the same requests")
    parser.add_argument("--peer-requests", type=int, help="the peer runs only the first N requests")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="profile the worker's step loop (cProfile) into PREFIX.<pid> and print the top")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.profile:
        import os

        os.environ["STREAMVLM_WORKER_PROFILE"] = args.profile

    from streamvlm import LLM, SamplingParams

    folder = args.model or shape_folder(args.shape)
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, device=args.device,
              dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, num_replicas=args.num_replicas,
              attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
              async_scheduling=ASYNC_SCHEDULING[args.async_scheduling])
    prompts, output_lens = workload(args.num_requests, args.min_len, args.max_len)
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate(requests[:2], [SamplingParams(max_tokens=8, ignore_eos=True)] * 2,
                 use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    output_tokens = sum(len(o.token_ids) for o in outputs)
    result = {"model": args.model or args.shape, "tensor_parallel_size": args.tensor_parallel_size,
              "num_replicas": args.num_replicas, "async_scheduling": args.async_scheduling, "device": llm.engine.groups[0].ready.device,
              "dtype": llm.config.model.dtype, "requests": len(requests),
              "prompt_tokens": sum(map(len, prompts)), "output_tokens": output_tokens,
              "seconds": round(elapsed, 3),
              "output_tokens_per_s": round(output_tokens / elapsed, 1)}
    if args.profile:
        print_profiles(args.profile)
    rows = [("streamvlm", result)]
    if args.peer == "transformers":
        count = args.peer_requests or len(prompts)
        peer = transformers_throughput(folder, prompts[:count], output_lens[:count], args.dtype)
        result["peer"] = peer
        result["ratio_vs_peer"] = round(result["output_tokens_per_s"] / peer["output_tokens_per_s"], 2)
        rows.append(("transformers", peer))
    print(f"{'engine':>13} {'requests':>9} {'output tokens':>14} {'seconds':>9} {'tok/s':>10}")
    for name, row in rows:
        print(f"{name:>13} {row['requests']:>9} {row['output_tokens']:>14} {row['seconds']:>9.2f} "
              f"{row['output_tokens_per_s']:>10.1f}")
    if "ratio_vs_peer" in result:
        print(f"streamvlm / transformers: {result['ratio_vs_peer']}x")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
