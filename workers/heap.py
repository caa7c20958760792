"""The cyclic garbage collector in a worker process that owns its process, once the worker is built.

A decode step at hundreds of sequences allocates a chunk per sequence, the step plan's lists and the
sampled tokens' lists, and frees them a step later. With CPython's default young threshold (700 net
allocations of tracked objects) that churn starts a young collection once or more per step, and every so
often a full one that walks every object the process holds: torch's, the model's modules, the KV pool's
tables. On a 2-core x86 machine, `python benchmarks/host_step.py --batch 1024` schedules a step in
1.06 ms with the default threshold and 0.61 ms with this policy.

After start-up the worker freezes what start-up made (the collector never walks it again) and raises
the young threshold, so that collections come from lasting growth only. Cycles are still collected;
reference counting frees everything else as before. The engine core has its own policy
(streamvlm/engine/gc_policy.py); a worker run as a thread of the core's process leaves the heap to it.
"""

from __future__ import annotations

import gc

WORKER_GEN0_THRESHOLD = 20_000


def settle_after_build() -> None:
    """Collect start-up's garbage, freeze the rest, and raise the young threshold (unless collection is off)."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0:
        gc.set_threshold(max(WORKER_GEN0_THRESHOLD, gen0), gen1, gen2)
