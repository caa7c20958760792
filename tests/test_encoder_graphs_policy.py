"""When EncoderGraphs captures, replays, evicts and stays eager (the capture itself is CUDA's and
is tested in tests/gpu/test_encoder_graphs.py; here it runs the function into static buffers)."""

from __future__ import annotations

import torch

from workers.encoder_graphs import CAPTURE_AFTER, CapturedBatch, EncoderGraphs


class ReplayingGraph:
    def __init__(self, run) -> None:
        self.run = run

    def replay(self) -> None:
        self.run()


class CPUGraphs(EncoderGraphs):
    """Captures by keeping the call: a replay runs it again into the static output."""

    def __init__(self, *args, fail_for=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captures: list = []
        self.fail_for = set(fail_for)

    def _capture(self, inputs, key):
        if key in self.fail_for:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures.append(key)
        prepared = self.prepare(key)
        static = inputs.clone()
        output = self.run(static, prepared)

        def again() -> None:
            output.copy_(self.run(static, prepared))

        return CapturedBatch(ReplayingGraph(again), static, output, prepared)


def doubled(inputs: torch.Tensor, prepared: int) -> torch.Tensor:
    return inputs * prepared


def test_captured_on_the_second_call_then_replayed_with_fresh_outputs():
    graphs = CPUGraphs(doubled, lambda key: 2, max_rows=100)
    results = [graphs(torch.full((4, 3), float(i)), "a") for i in range(4)]
    assert CAPTURE_AFTER == 2 and graphs.captures == ["a"] and graphs.replays == 3   # the capturing call replays too
    for i, result in enumerate(results):   # each call's own output, not a shared buffer
        assert torch.equal(result, torch.full((4, 3), 2.0 * i))


def test_least_recently_used_graph_dropped_and_large_batches_stay_eager():
    graphs = CPUGraphs(doubled, lambda key: 1, max_rows=8, max_graphs=2)
    for _ in range(2):
        for key, rows in (("a", 2), ("b", 2), ("big", 9)):
            graphs(torch.ones(rows, 1), key)
    assert list(graphs.graphs) == ["a", "b"]
    graphs(torch.ones(2, 1), "a")                  # a is now the most recent
    for _ in range(2):
        graphs(torch.ones(2, 1), "c")              # c captured: b goes
    assert list(graphs.graphs) == ["a", "c"] and "big" not in graphs.captures


def test_a_batch_that_cannot_be_captured_stays_eager():
    graphs = CPUGraphs(doubled, lambda key: 3, max_rows=100, fail_for={"x"})
    outputs = [graphs(torch.ones(2, 2), "x") for _ in range(4)]
    assert not graphs.graphs and graphs.failed == {"x"} and graphs.replays == 0
    assert all(torch.equal(out, torch.full((2, 2), 3.0)) for out in outputs)


def test_a_replay_refuses_inputs_of_another_shape():
    graphs = CPUGraphs(doubled, lambda key: 1, max_rows=100)
    for _ in range(2):
        graphs(torch.ones(2, 2), "k")
    try:
        graphs(torch.ones(3, 2), "k")
    except ValueError as exc:
        assert "captured with (2, 2)" in str(exc)
    else:
        raise AssertionError("a shape mismatch must be refused")
