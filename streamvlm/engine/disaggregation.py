"""Disaggregated prefill/decode, as the engine core orchestrates it: prefill groups compute
prompts and send the KV to decode groups, which generate the rest.

A request goes to both groups of its route at once: the decode group reserves blocks (and
reports its cached prefix, "reserved") while the prefill group computes the prompt; the core
then tells the prefill group to send the KV past that prefix (SendKV). Once the decode group
has it ("received") the prefill group frees its copy (ReleaseKV). A transfer that does not
complete within kv_transfer_timeout_s of the prefill ("prefilled") fails the request.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

import msgspec

from streamvlm.contract.protocol import (AcceptKVPeers, AddRequest, ConnectKVPeers, KVEvent, ReleaseKV,
                                         SendKV)
from streamvlm.engine.router import Route, Router
from streamvlm.engine.worker_group import WorkerGroup
from streamvlm.metrics import EngineMetrics


def connect_kv_peers(prefill: list[WorkerGroup], decode: list[WorkerGroup]) -> None:
    """Tell every prefill group where the decode groups take KV (and, with kv_transport
    "peer", the decode groups which prefill groups to link with)."""
    inboxes = {g.group_id: g.ready.kv_address for g in decode}
    stores = {g.group_id: g.ready.kv_store_address for g in decode if g.ready.kv_store_address}
    for group in decode:
        if stores:   # kv_transport "peer": links with every prefill group
            group.send(AcceptKVPeers(prefill_groups=[g.group_id for g in prefill]))
    for group in prefill:
        group.send(ConnectKVPeers(addresses=inboxes, stores=stores))


def send_split(request: AddRequest, route: Route) -> None:
    """Hand a request to both groups of its route."""
    assert route.prefill is not None
    # The decode group reserves blocks (and reports its cached prefix) while the prefill group
    # computes the prompt. The prefill group's first token is the one timings describe.
    route.group.send(msgspec.structs.replace(request, kv_role="decode", collect_timings=False))
    route.prefill.send(msgspec.structs.replace(request, kv_role="prefill",
                                               kv_peer=route.group.group_id))


class KVHandoffs:
    """The handoffs in flight: reacts to the groups' KV events, times the transfers.
    ``fail(request_id, error)`` ends a request whose handoff failed."""

    def __init__(self, transfer_timeout_s: float, router: Router, metrics: EngineMetrics,
                 fail: Callable[[str, str], None]) -> None:
        self.transfer_timeout_s = transfer_timeout_s
        self._router = router
        self._metrics = metrics
        self._fail = fail
        self._prefilled_at: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def on_event(self, event: KVEvent, route: Route, now: float) -> None:
        request_id = event.request_id
        assert route.prefill is not None
        if event.kind == "reserved":
            route.prefill.send(SendKV(request_id=request_id, skip_blocks=event.cached_blocks))
        elif event.kind == "prefilled" and not route.handed_off:   # not overtaken by "received"
            self._prefilled_at[request_id] = now
            # Holds this object weakly, so that an engine dropped meanwhile can be collected.
            self._timers[request_id] = asyncio.get_running_loop().call_later(
                self.transfer_timeout_s, _transfer_timed_out, weakref.ref(self), request_id)
        elif event.kind == "received":
            route.prefill.send(ReleaseKV(request_id=request_id))
            self._router.handed_off(route)
            self._cancel_timer(request_id)
            prefilled_at = self._prefilled_at.pop(request_id, now)
            self._metrics.kv_transferred(event.num_bytes, now - prefilled_at)
        elif event.kind == "failed":
            self._fail(request_id, event.error or "KV transfer failed")

    def forget(self, request_id: str) -> None:
        """The request ended: stop timing its transfer."""
        self._cancel_timer(request_id)
        self._prefilled_at.pop(request_id, None)

    def _cancel_timer(self, request_id: str) -> None:
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()

    def _timed_out(self, request_id: str) -> None:
        self._timers.pop(request_id, None)
        self._fail(request_id, f"the KV transfer to the decode group did not complete in "
                               f"{self.transfer_timeout_s:g} s")


def _transfer_timed_out(handoffs_ref: weakref.ref[KVHandoffs], request_id: str) -> None:
    handoffs = handoffs_ref()
    if handoffs is not None:
        handoffs._timed_out(request_id)
