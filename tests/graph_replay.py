"""A function's CUDA-graph replay, for GPU tests that compare it with eager launches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def replayed(fn: Callable[[], Any], replays: int = 3) -> Any:
    """fn() captured in a CUDA graph, after a warm-up call on a side stream (kernels compile, what fn keeps
    is allocated), then replayed ``replays`` times: the captured outputs, as the last replay left them."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return outputs
