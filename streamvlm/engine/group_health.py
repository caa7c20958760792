"""Liveness and health of the worker groups: each group is watched its own way (a local
process's exit, a thread that ended, a remote group gone silent, or a WorkerFailed it sent);
the first death of a group is reported once, to ``on_death(group, error)``."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

import msgspec

from streamvlm.contract.protocol import WorkerReady
from streamvlm.engine.router import Router
from streamvlm.engine.worker_group import WorkerGroup
from streamvlm.errors import EngineDeadError


class GroupHealth(msgspec.Struct, kw_only=True):
    group_id: int
    role: str = "mixed"
    pid: int | None
    alive: bool
    # Heard from within worker_step_timeout_s; an alive group that is not gets no new requests.
    responsive: bool = True
    host: str | None = None    # a remote group's host (its pid is one there)
    error: str | None = None
    num_requests: int = 0      # in flight now
    num_routed: int = 0        # ever routed to this group
    # What the group resolved for its device, as it reported once ready (None before).
    device: str | None = None
    dtype: str | None = None
    attention_backend: str | None = None
    async_scheduling: bool | None = None
    num_kv_blocks: int | None = None


class HealthReport(msgspec.Struct, kw_only=True):
    healthy: bool
    groups: list[GroupHealth]


class GroupWatch:
    def __init__(self, step_timeout_s: float,
                 on_death: Callable[[WorkerGroup, EngineDeadError], None]) -> None:
        self.step_timeout_s = step_timeout_s
        self._on_death = on_death

    def watch(self, group: WorkerGroup, loop: asyncio.AbstractEventLoop) -> None:
        # The group holds this watch only weakly: an engine dropped without shutdown() is
        # collected, and its finalizer stops the workers.
        watch_ref = weakref.ref(self)

        def on_dead(reason: str) -> None:
            watch = watch_ref()
            if watch is not None:
                watch.group_died(group, reason)

        group.watch(loop, on_dead)

    def group_died(self, group: WorkerGroup, reason: str) -> None:
        if group.dead_reason is not None:
            return
        group.mark_dead(reason)
        self._on_death(group, EngineDeadError(f"worker group {group.group_id} died: {reason}"))

    def report(self, groups: list[WorkerGroup], router: Router, engine_ok: bool) -> HealthReport:
        """``engine_ok``: started and not dead; healthy also needs every group alive and
        responsive."""
        health = [self._group_health(g, router) for g in groups]
        return HealthReport(healthy=engine_ok and all(g.alive and g.responsive for g in health),
                            groups=health)

    def _group_health(self, group: WorkerGroup, router: Router) -> GroupHealth:
        responsive = not group.alive or group.responsive
        error = group.dead_reason
        if not responsive:
            error = (f"no progress for {group.silent_for:.0f} s "
                     f"(worker_step_timeout_s={self.step_timeout_s:g})")
        load = router.load(group.group_id)
        return GroupHealth(group_id=group.group_id, role=group.role, pid=group.pid, alive=group.alive,
                           responsive=responsive, host=group.host, error=error,
                           num_requests=load.num_requests, num_routed=load.num_routed,
                           **_device_settings(group.ready))


def _device_settings(ready: WorkerReady | None) -> dict[str, object]:
    if ready is None:
        return {}
    return {"device": ready.device, "dtype": ready.dtype, "attention_backend": ready.attention_backend,
            "async_scheduling": ready.async_scheduling, "num_kv_blocks": ready.num_kv_blocks}
