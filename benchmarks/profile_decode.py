"""Where a decode step's GPU time goes: one eager decode step of a real model's shapes (random
weights) under torch.profiler, kernel time by kind, against the CUDA-graph replay of the same step.

On the GPU machine:
    python benchmarks/profile_decode.py --shape qwen3-8b --batch 1 --context 192
    python benchmarks/profile_decode.py --shape qwen3-0.6b --batch 256 --context 1100
Batch-1 GEMV configs in place (kernel times per layer kind, without programmatic launch so that
the times do not include the wait for the kernel before):
    STREAMVLM_DISABLE_PDL=1 python benchmarks/profile_decode.py --batch 1 --gemv-configs 4,2048,4 16,1024,8
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402

KINDS = [("attention", ("paged_decode", "paged_prefill")), ("kv store", ("store_kv",)),
         ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "splitk", "split_k")), ("rms norm", ("rms_norm",)),
         ("q/k norm + rotary", ("qk_norm_rope",)), ("silu-and-mul", ("silu_and_mul",))]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KINDS:
        if any(key in lowered for key in keys):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--gemv-configs", nargs="*", default=[],
                        help="block_n,block_k,num_warps of the batch-1 GEMV to time in place, each with "
                             "SiLU-and-mul fused into the down projection and apart")
    parser.add_argument("--json")
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from streamvlm.contract.config import EngineConfig, resolve
    from streamvlm.contract.model_source import resolve_model
    from workers.device_settings import resolve_for_device
    from workers.rank_messages import StepPlan
    from workers.model_runner import ModelRunner

    bs = 16
    blocks_per_seq = -(-(args.context + 1) // bs)
    config = EngineConfig(model=shape_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
                          device="cuda", dtype="bfloat16", max_model_len=4096, block_size=bs,
                          num_kv_blocks=args.batch * blocks_per_seq + 1, max_num_seqs=args.batch)
    source = resolve_model(config.model.model)
    config = resolve(config, source.text_config)
    runner = ModelRunner(config, source, resolve_for_device(config, source.hf_config, tp_size=1))
    tables = [[1 + s * blocks_per_seq + i for i in range(blocks_per_seq)] for s in range(args.batch)]
    pos = args.context
    slots = np.array([t[pos // bs] * bs + pos % bs for t in tables], dtype=np.int64)
    plan = StepPlan(input_ids=[7] * args.batch, positions=[pos] * args.batch, slot_mapping=slots.tobytes(),
                    block_tables=np.array(tables, dtype=np.int32).tobytes(), block_table_width=blocks_per_seq,
                    query_lens=[1] * args.batch, seq_lens=[pos + 1] * args.batch,
                    logits_rows=list(range(args.batch)))

    def step(graphs: bool) -> None:
        saved = runner.decode_graphs
        runner.decode_graphs = saved if graphs else None
        with torch.inference_mode():
            hidden, rows = runner._forward(plan, None)
            runner.model.compute_logits(hidden if rows is None else hidden[rows]).argmax(-1)
        runner.decode_graphs = saved

    def timed(graphs: bool, iters: int = 50) -> float:
        for _ in range(5):
            step(graphs)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step(graphs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    graph_ms, eager_ms = timed(True), timed(False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(False)
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key and not event.key.startswith(("ProfilerStep", "cuda")):
            by_kind[kind_of(event.key)] += device_us / 5 / 1000
            count[kind_of(event.key)] += event.count // 5
    kernel_ms = sum(by_kind.values())
    print(f"{args.shape} batch {args.batch} context {args.context}: graph step {graph_ms:.3f} ms, "
          f"eager step {eager_ms:.3f} ms, kernels {kernel_ms:.3f} ms ({sum(count.values())} launches)")
    print(f"{'kind':>20} {'ms/step':>8} {'share':>6} {'launches':>9}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:>20} {ms:>8.3f} {100 * ms / kernel_ms:>5.1f}% {count[kind]:>9}")
    top = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "device_time_total", 0) or 0))[:12]
    for event in top:
        print(f"    {(getattr(event, 'device_time_total', 0) or 0) / 5 / 1000:8.3f} ms  {event.count // 5:4d}x  "
              f"{event.key[:100]}")
    gemv_rows = [gemv_in_place(config, step) for config in args.gemv_configs]
    if gemv_rows:
        kinds = list(gemv_rows[0]["ms"])
        print(f"{'GEMV config':>14}" + "".join(f"{k:>14}" for k in kinds) + f"{'total ms':>10}")
        for row in gemv_rows:
            print(f"{row['config']:>14}" + "".join(f"{row['ms'][k]:>14.3f}" for k in kinds)
                  + f"{sum(row['ms'].values()):>10.3f}")
    write_json(args.json, {"shape": args.shape, "batch": args.batch, "context": args.context,
                                               "graph_step_ms": graph_ms, "eager_step_ms": eager_ms,
                                               "kernel_ms": kernel_ms, "by_kind_ms": by_kind, "gemv": gemv_rows})


GEMV_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def gemv_in_place(config: str, step, steps: int = 5) -> dict:
    """Per-step milliseconds of each layer kind's GEMV (the gate/up one with SiLU-and-mul in its epilogue)
    in eager decode steps with the given GEMV config."""
    import json
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from workers.kernels import gemv

    gemv._ENV_CONFIG = gemv.GemvConfig(*(int(part) for part in config.split(",")))
    try:
        for _ in range(2):
            step(False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(False)
            torch.cuda.synchronize()
    finally:
        gemv._ENV_CONFIG = gemv._config_from_env()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace_file:
        prof.export_chrome_trace(trace_file.name)
        events = json.load(open(trace_file.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    gemvs = [e for e in kernels if "gemv_kernel" in e["name"]]
    per_step = len(gemvs) // steps
    ms: dict[str, float] = defaultdict(float)
    for index, event in enumerate(gemvs):
        position = index % per_step
        name = "lm_head" if position == per_step - 1 else GEMV_LAYERS[position % len(GEMV_LAYERS)]
        ms[name] += event["dur"] / 1000 / steps
    return {"config": config, "ms": dict(ms)}


if __name__ == "__main__":
    main()
