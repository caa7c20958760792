"""Engines for white-box tests: the worker loop in a thread of the test process (same engine
core, ZeroMQ and msgspec path as worker processes, without the process start-up cost)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from streamvlm import LLM
from streamvlm.config import EngineConfig
from streamvlm.inputs.processor import resolve_max_model_len
from streamvlm.model_source import resolve_model


def local_llm(model: str | Path | None = None, **kwargs: Any) -> LLM:
    kwargs.setdefault("worker_backend", "thread")
    return LLM(str(model) if model is not None else None, **kwargs)


def worker_of(llm: LLM) -> Any:
    """The Worker behind a thread-backend LLM."""
    worker = llm.engine.groups[0].local_worker
    assert worker is not None, "worker_of needs worker_backend='thread'"
    return worker


def wait_idle(llm: LLM, timeout: float = 10.0) -> Any:
    """Wait until the worker holds no request (late aborts land asynchronously)."""
    worker = worker_of(llm)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.sequences and not any(worker.pool.ref_counts):
            break
        time.sleep(0.01)
    return worker


def make_worker(model: str | Path, **kwargs: Any) -> Any:
    """A Worker driven directly by the test (no engine core, no thread)."""
    from workers.worker import Worker

    config = EngineConfig.from_kwargs(model=str(model), **kwargs)
    source = resolve_model(config.model)
    return Worker(config, source, resolve_max_model_len(config, source.hf_config))
