"""Worker groups on other hosts: the listen socket they join through, and the engine core's
handle on one such group. Same messages and sockets as a local group (over tcp); with no
process to watch, liveness is heard: any message, or a Heartbeat, within the timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from streamvlm.contract.config import EngineConfig, tcp_host_port
from streamvlm.engine.worker_client import STARTUP_TIMEOUT_S, group_sockets, receive_ready
from streamvlm.errors import EngineDeadError
from streamvlm.contract.protocol import (HEARTBEAT_INTERVAL_S, CoreToWorker, Heartbeat, JoinAccepted,
                                JoinRefused, JoinReply, JoinRequest, Shutdown, StepStats,
                                WorkerReady, WorkerToCore)

# Lets a Shutdown reach the worker after its socket is closed.
SHUTDOWN_LINGER_MS = 1000
REMOTE_CHECK_S = 0.1   # how often a remote group's liveness is checked


class RemoteWorkerGroup:
    role = "mixed"   # remote groups are replicas (prefill/decode groups are local)
    def __init__(self, group_id: int, config: EngineConfig, ctx: zmq.asyncio.Context) -> None:
        self.group_id = group_id
        self.config = config
        self._ctx = ctx
        self._encoder = msgspec.msgpack.Encoder()
        self._heartbeat = self._encoder.encode(Heartbeat())
        self.decoder = msgspec.msgpack.Decoder(WorkerToCore)
        self.join: JoinRequest | None = None
        self.joined = asyncio.Event()
        self.ready: WorkerReady | None = None
        self.stats = StepStats()
        self.dead_reason: str | None = None
        self.last_heard = 0.0          # time.monotonic() of the latest message from the worker
        self.connection_lost = False
        self.inbox: zmq.asyncio.Socket | None = None    # core -> worker
        self.outbox: zmq.asyncio.Socket | None = None   # worker -> core
        # The inbox as a plain socket: an asyncio socket's non-blocking send reports "no peer"
        # in a future nobody awaits; this one raises it here.
        self._sender: zmq.Socket | None = None
        self._heartbeats: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def processes(self) -> list:
        return []   # none on this host

    @property
    def host(self) -> str | None:
        return self.join.hostname if self.join else None

    @property
    def pid(self) -> int | None:
        """The worker's pid on its own host."""
        return self.ready.pid if self.ready else (self.join.pid if self.join else None)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.ready is not None

    @property
    def name(self) -> str:
        return f"remote worker group {self.group_id} (host {self.host}, pid {self.pid})"

    def accept(self, join: JoinRequest) -> JoinAccepted:
        """Take this worker: bind the group's sockets on the listen interface."""
        host, _ = tcp_host_port(self.config.parallel.worker_listen_address or "", "worker_listen_address")
        self.inbox, self.outbox = group_sockets(self._ctx)
        # The queue is unbounded, so a send that would block only means the worker is not connected.
        self._sender = zmq.Socket.shadow(self.inbox.underlying)
        input_port = self.inbox.bind_to_random_port(f"tcp://{host}")
        output_port = self.outbox.bind_to_random_port(f"tcp://{host}")
        self.join = join
        self.last_heard = time.monotonic()
        # From now on: the worker leaves if it hears nothing, even while other groups start.
        self._heartbeats = asyncio.get_running_loop().create_task(self._send_heartbeats())
        self.joined.set()
        return JoinAccepted(group_id=self.group_id, config=msgspec.msgpack.encode(self.config),
                            input_port=input_port, output_port=output_port)

    async def start(self) -> WorkerReady:
        """Wait for a worker to join as this group and report ready."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            await asyncio.wait_for(self.joined.wait(), STARTUP_TIMEOUT_S)
        except TimeoutError:
            raise EngineDeadError(
                f"no remote worker joined as group {self.group_id} at "
                f"{self.config.parallel.worker_listen_address} in {STARTUP_TIMEOUT_S:.0f} s") from None

        def heard() -> None:
            self.last_heard = time.monotonic()

        message = await receive_ready(self.outbox, self.decoder, self.name, deadline, self.failure, self.kill,
                                      heard)
        await self._wait_connected(deadline)
        self.ready = message
        self.stats = StepStats(num_free_blocks=message.num_kv_blocks, num_total_blocks=message.num_kv_blocks)
        return message

    async def _wait_connected(self, deadline: float) -> None:
        # The worker connected its input before loading the model, so this is all but certain;
        # checking it makes a later "no connected peer" mean the worker is gone.
        while True:
            try:
                self._sender.send(self._heartbeat, zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"{self.name} never connected its input") from None
                await asyncio.sleep(0.01)

    @property
    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    @property
    def responsive(self) -> bool:
        """As a local group's; silence past remote_worker_timeout_s makes the group dead anyway."""
        return self.silent_for <= self.config.parallel.worker_step_timeout_s

    def failure(self) -> str | None:
        """Why the group counts as dead from here; None while it is heard from in time."""
        if self.connection_lost:
            return f"{self.name} lost its connection to the engine core"
        silent = time.monotonic() - self.last_heard
        if silent > self.config.parallel.remote_worker_timeout_s:
            return f"{self.name} sent nothing for {silent:.1f} s"
        return None

    def watch(self, loop: asyncio.AbstractEventLoop, on_dead: Callable[[str], None]) -> None:
        """No process here to watch: liveness is heard (see failure)."""
        self._watcher = loop.create_task(self._watch(on_dead))

    async def _watch(self, on_dead: Callable[[str], None]) -> None:
        while self.dead_reason is None:
            await asyncio.sleep(REMOTE_CHECK_S)
            reason = self.failure()
            if reason is not None:
                on_dead(reason)

    def unwatch(self) -> None:
        _cancel(self._watcher)

    async def _send_heartbeats(self) -> None:
        while True:
            self._send_frame(self._heartbeat)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    def send(self, message: CoreToWorker) -> None:
        self._send_frame(self._encoder.encode(message))

    def _send_frame(self, frame: bytes) -> None:
        if self.inbox is None or self.inbox.closed:
            return
        try:
            self._sender.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            # No connected worker (the queue is unbounded): the message is lost, and so is
            # the group once ready (before, only heartbeats are sent and lost).
            if self.ready is not None:
                self.connection_lost = True

    def mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
        # Silence from here makes a worker that is still running leave by itself.
        self._stop_heartbeats()
        if self.inbox is not None and not self.inbox.closed:
            self.inbox.close(linger=0)

    async def shutdown(self, timeout: float = 5.0) -> None:
        if self.alive:
            self.send(Shutdown())
        self._stop_heartbeats()
        if self.inbox is not None and not self.inbox.closed:
            self.inbox.close(linger=SHUTDOWN_LINGER_MS)
        self.kill()

    def kill(self) -> None:
        """Close the sockets (safe to call twice); the worker then leaves within its timeout."""
        self.unwatch()
        self._stop_heartbeats()
        for sock in (self.inbox, self.outbox):
            if sock is not None and not sock.closed:
                sock.close(linger=0)

    def _stop_heartbeats(self) -> None:
        _cancel(self._heartbeats)


def _cancel(task: asyncio.Task | None) -> None:
    if task is not None and not task.done():
        try:
            task.cancel()
        except RuntimeError:   # from a finalizer, after the event loop closed
            pass


class WorkerListener:
    """The socket at worker_listen_address: each worker that asks gets the next free group."""

    def __init__(self, address: str, ctx: zmq.asyncio.Context,
                 groups: list[RemoteWorkerGroup]) -> None:
        self.address = address
        self.bound_address: str | None = None   # port 0 in address: the one the OS picked
        self.groups = groups
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)

    def bind(self) -> None:
        try:
            self._sock.bind(self.address)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ValueError(f"cannot listen at worker_listen_address {self.address!r}: "
                             f"{exc}") from exc
        self.bound_address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve(self) -> None:
        """Answer joins for as long as the engine runs (late ones are refused, not left hanging)."""
        while True:
            # [identity, payload] from a DEALER; a REQ adds an empty delimiter in between.
            frames = await self._sock.recv_multipart()
            reply = self._answer(frames[-1])
            await self._sock.send_multipart([*frames[:-1], msgspec.msgpack.encode(reply)])

    def _answer(self, frame: bytes) -> JoinReply:
        try:
            join = msgspec.msgpack.decode(frame, type=JoinRequest)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return JoinRefused(reason="expected a JoinRequest")
        free = [g for g in self.groups if g.join is None]
        if not free:
            return JoinRefused(reason=f"all {len(self.groups)} remote worker groups have joined")
        return free[0].accept(join)

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)
