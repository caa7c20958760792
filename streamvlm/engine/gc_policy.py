"""The cyclic garbage collector's young-generation threshold while an engine core serves.

At hundreds of streams, every step allocates an output delta, a token list and a string per
request, and the consumers free them a moment later. With CPython's default threshold (700 net
allocations of tracked objects) that churn alone starts a young collection several times per
step, and every so often a full one that walks every object the process holds (the tokenizer,
its vocab, every imported module): on a 1,024-stream benchmark the collector took a third of
the engine core's CPU, in pauses of up to a second. A step's churn stays far below
``SERVING_GEN0_THRESHOLD``, so while an engine runs collections come from lasting growth only.
Cycles are still collected; reference counting frees everything else as before. The last engine
to shut down puts the previous threshold back.
"""

from __future__ import annotations

import gc

SERVING_GEN0_THRESHOLD = 20_000

_engines_serving = 0
_saved_threshold: tuple[int, int, int] | None = None


def serving_started() -> None:
    global _engines_serving, _saved_threshold
    _engines_serving += 1
    if _engines_serving == 1:
        gen0, gen1, gen2 = _saved_threshold = gc.get_threshold()
        if gen0:   # 0: automatic collection is off, and stays so
            gc.set_threshold(max(SERVING_GEN0_THRESHOLD, gen0), gen1, gen2)


def serving_stopped() -> None:
    global _engines_serving, _saved_threshold
    if _engines_serving == 0:
        return
    _engines_serving -= 1
    if _engines_serving == 0 and _saved_threshold is not None:
        gc.set_threshold(*_saved_threshold)
        _saved_threshold = None
