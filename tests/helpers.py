"""Engines for white-box tests: the worker loop in a thread of the test process (same engine
core, ZeroMQ and msgspec path as worker processes, without the process start-up cost)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from streamvlm import LLM
from streamvlm.contract.config import EngineConfig, resolve
from streamvlm.contract.model_source import resolve_model


def run(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 60.0) -> Any:
    """Run a coroutine on a test module's loop, never for longer than ``timeout``."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


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
    from workers.device_settings import resolve_for_device
    from workers.worker import Worker

    config = EngineConfig.from_kwargs(model=str(model), **kwargs)
    source = resolve_model(config.model.model)
    config = resolve(config, source.text_config)
    return Worker(config, source, resolve_for_device(config, source.hf_config, tp_size=1))


def child_pids() -> set[int]:
    """Pids of this process's children, zombies included (an unreaped child counts as left
    behind); multiprocessing's resource tracker, which lives as long as the test process, is
    left out. Read from /proc (Linux)."""
    import os

    me, pids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue   # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"resource_tracker" not in cmdline:
            pids.add(int(entry))
    return pids


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts) (Linux)."""
    import os

    return os.path.exists(f"/proc/{pid}")
