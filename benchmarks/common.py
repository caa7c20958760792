"""What the benchmarks share besides model shapes."""

from __future__ import annotations

import json
from pathlib import Path

# --async-scheduling, as EngineConfig.scheduler.async_scheduling.
ASYNC_SCHEDULING = {"auto": None, "on": True, "off": False}


def write_json(path: str | None, data: object) -> None:
    """A benchmark's --json result (nothing when path is None), its folder made if need be."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def seconds_per_replay(fn, repeats: int) -> float:
    """Seconds per replay of a CUDA graph of fn(), captured after one warm-up call on a side stream
    (which compiles kernels and allocates what fn keeps)."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def add_workload_arguments(parser) -> None:
    """The throughput workload's flags (nano-vllm's: random prompt and output lengths), shared by
    throughput.py and structured_output.py."""
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


def milliseconds_per_call(fn, repeats: int, warmup: int = 3) -> float:
    """Milliseconds per call of fn() on the current CUDA stream (CUDA events), after warm-up calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
