"""Read a worker's step timeline (STREAMVLM_STEP_TIMELINE=PREFIX[:FIRST:COUNT], a Chrome trace of
torch.profiler) and say, per step, where its wall time went: the device work it launched, how
busy the device was during it, how long the host waited for the device, and the kernels that
took the most device time.

    STREAMVLM_STEP_TIMELINE=/tmp/tl:300:40 python benchmarks/vlm_serving.py
    python benchmarks/step_timeline.py /tmp/tl.*.json [--steps] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

SYNC_CALLS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def union_within(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of the intervals, clipped to [lo, hi]."""
    total, end = 0.0, lo
    for start, stop in sorted(intervals):
        start, stop = max(start, end), min(stop, hi)
        if stop > start:
            total += stop - start
            end = stop
    return total


def load(path: str) -> tuple[list[dict], list[dict], dict[int, list[dict]], list[dict]]:
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("step ")),
                   key=lambda e: e["ts"])
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    # One launch may start many kernels (a CUDA graph replay): kernels by the launch they belong to.
    by_correlation: dict[int, list[dict]] = defaultdict(list)
    for e in device:
        if "correlation" in e.get("args", {}):
            by_correlation[e["args"]["correlation"]].append(e)
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    return steps, device, by_correlation, runtime


def analyse(path: str, top: int, per_step: bool) -> None:
    steps, device, by_correlation, runtime = load(path)
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in device]
    rows = []
    kernel_time: dict[str, float] = defaultdict(float)
    for step in steps:
        lo, hi = step["ts"], step["ts"] + step["dur"]
        calls = [e for e in runtime if lo <= e["ts"] < hi]
        launched = [kernel for c in calls for kernel in by_correlation.get(c.get("args", {}).get("correlation"), ())]
        waited = sum(c["dur"] for c in calls if c["name"].startswith(SYNC_CALLS))
        step_kernels: dict[str, float] = defaultdict(float)
        for kernel in launched:
            step_kernels[kernel["name"][:90]] += kernel["dur"]
            kernel_time[kernel["name"][:90]] += kernel["dur"]
        rows.append({"step": step["name"], "wall_ms": step["dur"] / 1e3,
                     "launched_ms": sum(k["dur"] for k in launched) / 1e3, "launches": sum(1 for c in calls if "Launch" in c["name"]),
                     "busy_ms": union_within(spans, lo, hi) / 1e3, "wait_ms": waited / 1e3,
                     "top": sorted(step_kernels.items(), key=lambda kv: -kv[1])[:3]})
    if not rows:
        print(f"{path}: no steps")
        return
    wall = sum(r["wall_ms"] for r in rows)
    busy = sum(r["busy_ms"] for r in rows)
    print(f"{path}: {len(rows)} steps, {wall:.1f} ms of wall time, device busy {busy:.1f} ms "
          f"({100 * busy / wall:.0f}%), host waiting on the device {sum(r['wait_ms'] for r in rows):.1f} ms")
    kinds: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        kinds["eager (>200 launches)" if row["launches"] > 200 else "graph / small"].append(row)
    for kind, members in kinds.items():
        print(f"  {kind:24s} steps {len(members):4d}  wall p50 {statistics.median(r['wall_ms'] for r in members):7.2f} ms"
              f"  launched p50 {statistics.median(r['launched_ms'] for r in members):7.2f} ms"
              f"  busy p50 {statistics.median(r['busy_ms'] for r in members):7.2f} ms"
              f"  wait p50 {statistics.median(r['wait_ms'] for r in members):6.2f} ms"
              f"  launches p50 {statistics.median(r['launches'] for r in members):6.0f}")
    if per_step:
        print(f"  {'step':>10} {'wall':>8} {'launched':>9} {'busy':>8} {'wait':>7} {'launches':>8}  top kernels")
        for r in rows:
            tops = "; ".join(f"{name[:40]} {us / 1e3:.1f}" for name, us in r["top"])
            print(f"  {r['step']:>10} {r['wall_ms']:8.2f} {r['launched_ms']:9.2f} {r['busy_ms']:8.2f} "
                  f"{r['wait_ms']:7.2f} {r['launches']:8d}  {tops}")
    print(f"  top kernels over the window (ms): ")
    for name, us in sorted(kernel_time.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {us / 1e3:9.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--steps", action="store_true", help="one line per step")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.paths:
        analyse(path, args.top, args.steps)


if __name__ == "__main__":
    main()
