"""What the engine core needs of a worker group, local (``WorkerGroupClient``) or on another
host (``RemoteWorkerGroup``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import msgspec
import zmq.asyncio

from streamvlm.contract.protocol import CoreToWorker, StepStats, WorkerReady


class WorkerGroup(Protocol):
    group_id: int
    stats: StepStats              # from its latest step output
    ready: WorkerReady | None
    dead_reason: str | None
    last_heard: float             # time.monotonic() of its latest message
    outbox: zmq.asyncio.Socket | None   # worker -> core
    decoder: msgspec.msgpack.Decoder

    @property
    def role(self) -> str: ...          # "mixed", "prefill" or "decode"

    @property
    def host(self) -> str | None: ...   # a remote group's host; None for this one

    @property
    def pid(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def silent_for(self) -> float: ...

    @property
    def responsive(self) -> bool: ...

    async def start(self) -> WorkerReady: ...

    def send(self, message: CoreToWorker) -> None: ...

    def watch(self, loop: asyncio.AbstractEventLoop, on_dead: Callable[[str], None]) -> None:
        """Call on_dead(reason) once the group is found dead (the way depends on the group)."""

    def unwatch(self) -> None: ...

    def mark_dead(self, reason: str) -> None: ...

    async def shutdown(self, timeout: float = 5.0) -> None: ...

    def kill(self) -> None:
        """End the group's processes (if here) and close its sockets; stops the watch."""
