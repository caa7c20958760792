"""The worker's step timeline (STREAMVLM_STEP_TIMELINE: a window of steps under torch.profiler,
written as a Chrome trace) and benchmarks/step_timeline.py, which reads it back per step."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.step_timeline import analyse, union_within
from workers.main import StepTimeline


def test_a_window_of_steps_is_written_with_one_mark_per_step(tmp_path):
    timeline = StepTimeline(str(tmp_path / "timeline.json"), first=3, count=2)
    for _ in range(6):
        timeline.before_step()
        torch.ones(64, 64) @ torch.ones(64, 64)
    timeline.close()
    events = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    marks = sorted(e["name"] for e in events if e.get("cat") == "user_annotation")
    assert marks == ["step 3", "step 4"]
    assert any(e.get("name") == "aten::mm" for e in events)


def test_the_setting_names_the_file_and_the_window(tmp_path):
    timeline = StepTimeline.from_setting(f"{tmp_path}/tl:10:4")
    assert (timeline.first, timeline.count) == (10, 4) and timeline.path.startswith(f"{tmp_path}/tl.")
    default = StepTimeline.from_setting(f"{tmp_path}/tl")
    assert (default.first, default.count) == (200, 50)
    with pytest.raises(ValueError, match="PREFIX"):
        StepTimeline.from_setting(f"{tmp_path}/tl:ten")
    with pytest.raises(ValueError, match="from 1"):   # steps count from 1: a window from 0 would record nothing
        StepTimeline.from_setting(f"{tmp_path}/tl:0:24")


def test_device_time_is_counted_once_and_within_each_step(tmp_path, capsys):
    assert union_within([(0, 10), (5, 20), (30, 40)], 8, 35) == 12 + 5
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "step 1", "ts": 0, "dur": 10_000},
        {"ph": "X", "cat": "user_annotation", "name": "step 2", "ts": 10_000, "dur": 5_000},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100, "dur": 20, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1_000, "dur": 6_000, "args": {"correlation": 7}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaEventSynchronize", "ts": 2_000, "dur": 5_000, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10_500, "dur": 20, "args": {"correlation": 8}},
        {"ph": "X", "cat": "kernel", "name": "attention", "ts": 12_000, "dur": 1_000, "args": {"correlation": 8}},
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    analyse(str(path), top=5, per_step=True)
    out = capsys.readouterr().out
    assert "2 steps, 15.0 ms of wall time, device busy 7.0 ms (47%), host waiting on the device 5.0 ms" in out
    assert "gemm" in out and "attention" in out
