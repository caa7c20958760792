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
