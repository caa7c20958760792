"""The engine core's handle on one worker group: its process, its sockets, its liveness."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from streamvlm.contract.config import EngineConfig, GroupSpec
from streamvlm.engine.worker_process import LocalWorkerProcess
from streamvlm.errors import EngineDeadError
from streamvlm.contract.protocol import (CoreToWorker, Shutdown, StepStats, WorkerFailed, WorkerReady,
                                WorkerToCore)

STARTUP_TIMEOUT_S = 600.0
THREAD_POLL_S = 0.2   # how often a thread-backend group's liveness is checked


async def receive_ready(outbox: zmq.asyncio.Socket, decoder: msgspec.msgpack.Decoder, name: str,
                        deadline: float, failure: Callable[[], str | None], kill: Callable[[], None],
                        heard: Callable[[], None] | None = None) -> WorkerReady:
    """A starting group's WorkerReady, local or remote. Its WorkerFailed raises the worker's error (ValueError
    for a bad configuration); failure() (a process that ended, a silent remote) or the deadline raises
    EngineDeadError; either way the group is killed first. heard() is called on every message."""
    while time.monotonic() < deadline:
        if await outbox.poll(100):
            message = decoder.decode(await outbox.recv())
            if heard is not None:
                heard()
            if isinstance(message, WorkerReady):
                return message
            if isinstance(message, WorkerFailed):
                kill()
                error = ValueError if message.error_type == "ValueError" else RuntimeError
                raise error(f"{name} failed to start: {message.message}")
        elif (reason := failure()) is not None:
            kill()
            raise EngineDeadError(f"{reason} during start-up")
    kill()
    raise EngineDeadError(f"{name} did not start in {STARTUP_TIMEOUT_S:.0f} s")


def group_sockets(ctx: zmq.asyncio.Context) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
    """A group's PUSH socket (requests to the worker) and PULL socket (its step outputs): no linger, and no
    high-water mark, so that a burst of requests while the worker is in a long step queues instead of being
    dropped (a non-blocking send on an asyncio socket would lose it silently)."""
    inbox, outbox = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.LINGER, 0)
    inbox.setsockopt(zmq.SNDHWM, 0)
    outbox.setsockopt(zmq.RCVHWM, 0)
    return inbox, outbox


IPC_DIR_PREFIX = "streamvlm-"


def make_ipc_dir() -> str:
    """A fresh folder for one group's ipc sockets, named after this process: see
    remove_stale_ipc_dirs."""
    return tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-")


def remove_stale_ipc_dirs(tmp: str | None = None) -> list[str]:
    """Remove the socket folders of engine cores that are gone (a killed core cannot clean up);
    returns them. The owner is the pid in the name; a folder whose owner lives, or may live
    (another user's), is kept."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in os.listdir(tmp):
        # "streamvlm-PID-RANDOM"; mkdtemp's RANDOM has no "-".
        owner, dash, _ = name.removeprefix(IPC_DIR_PREFIX).partition("-")
        if (not name.startswith(IPC_DIR_PREFIX) or not dash or not owner.isdigit()
                or _pid_alive(int(owner))):
            continue
        path = os.path.join(tmp, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process
    return True


class WorkerGroupClient:
    host: str | None = None    # this host (remote groups name theirs)

    def __init__(self, group_id: int, config: EngineConfig, ctx: zmq.asyncio.Context,
                 spec: GroupSpec | None = None) -> None:
        self.group_id = group_id
        self.config = config
        self.spec = spec or GroupSpec(tensor_parallel_size=config.parallel.tensor_parallel_size)
        self.role = self.spec.role
        self._ctx = ctx
        self._encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(WorkerToCore)
        self.process: LocalWorkerProcess | threading.Thread | None = None
        self.local_worker: Any = None   # the Worker itself, with the thread backend
        # Set when the group is let go: a thread-backend worker, which has no parent process to
        # lose, leaves on it.
        self._stopped = threading.Event()
        self.followers: list[LocalWorkerProcess] = []   # tensor-parallel ranks 1..T-1
        self.ready: WorkerReady | None = None
        self.stats = StepStats()
        self.dead_reason: str | None = None
        self.last_heard = 0.0   # time.monotonic() of the latest message (see responsive)
        self._ipc_dir: str | None = None
        self.inbox: zmq.asyncio.Socket | None = None    # core -> worker
        self.outbox: zmq.asyncio.Socket | None = None   # worker -> core
        # The inbox as a plain socket: a non-blocking send needs none of the asyncio socket's
        # future machinery, which cost a request's submission more than the send itself.
        self._sender: zmq.Socket | None = None
        self._poller: asyncio.Task | None = None   # the thread backend's liveness poll

    @property
    def processes(self) -> list[Any]:
        """Every process of the group: rank 0 first, then the tensor-parallel followers."""
        return ([self.process] if self.process is not None else []) + self.followers

    @property
    def alive(self) -> bool:
        return (self.dead_reason is None and self.process is not None
                and all(p.is_alive() for p in self.processes))

    @property
    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    @property
    def responsive(self) -> bool:
        """Heard from within worker_step_timeout_s. The step loop itself sends a heartbeat when
        it has sent nothing else for a second, so longer silence means it is stuck: stopped,
        or hung in a step or a collective. The process is left alone: it may come back."""
        return self.silent_for <= self.config.parallel.worker_step_timeout_s

    def _bind(self) -> tuple[str, str]:
        self.inbox, self.outbox = group_sockets(self._ctx)
        self._sender = zmq.Socket.shadow(self.inbox.underlying)
        if self.config.parallel.worker_transport == "tcp":
            in_port = self.inbox.bind_to_random_port("tcp://127.0.0.1")
            out_port = self.outbox.bind_to_random_port("tcp://127.0.0.1")
            return f"tcp://127.0.0.1:{in_port}", f"tcp://127.0.0.1:{out_port}"
        folder = self._group_dir()
        addresses = (f"ipc://{folder}/in", f"ipc://{folder}/out")
        self.inbox.bind(addresses[0])
        self.outbox.bind(addresses[1])
        return addresses

    def _group_dir(self) -> str:
        """The group's folder for ipc sockets and rendezvous files, made on first use."""
        if self._ipc_dir is None:
            remove_stale_ipc_dirs()
            self._ipc_dir = make_ipc_dir()
        return self._ipc_dir

    async def start(self) -> WorkerReady:
        input_address, output_address = self._bind()
        config_bytes = msgspec.msgpack.encode(self.config)
        name = f"streamvlm-worker-{self.group_id}"
        size = self.spec.tensor_parallel_size
        first = self.group_id * size
        device_ids = (self.spec.devices or
                      (self.config.parallel.devices[first:first + size] if self.config.parallel.devices
                       else list(range(first, first + size))))
        kv = {"kv_role": self.role, "kv_address": self._kv_address(), "kv_group_id": self.group_id}
        if self.config.parallel.worker_backend == "thread":
            from workers.main import run_worker
            self.process = threading.Thread(
                target=run_worker, name=name, daemon=True, kwargs={**kv, "stopped": self._stopped},
                args=(config_bytes, input_address, output_address, os.getpid(), self._set_local_worker))
            self.process.start()
        else:
            self._launch_processes(name, config_bytes, input_address, output_address, device_ids, kv)

        def failure() -> str | None:
            return None if all(p.is_alive() for p in self.processes) else self.exit_description()

        message = await receive_ready(self.outbox, self.decoder, f"worker {self.group_id}",
                                      time.monotonic() + STARTUP_TIMEOUT_S, failure, self.kill)
        self.ready = message
        self.last_heard = time.monotonic()
        self.stats = StepStats(num_free_blocks=message.num_kv_blocks, num_total_blocks=message.num_kv_blocks)
        return message

    def _launch_processes(self, name: str, config_bytes: bytes, input_address: str, output_address: str,
                          device_ids: list[int], kv: dict[str, Any]) -> None:
        """Rank 0 and the tensor-parallel followers, each a fresh interpreter (see worker_process)."""
        from workers.launch import WorkerLaunch

        size = self.spec.tensor_parallel_size
        setups: list[Any] = [None]
        if size > 1:
            from workers.distributed import TPSetup
            from workers.main import ANY_PORT
            # Nothing to race other processes for: a rendezvous file in the group's folder, and
            # (tcp) a plan port rank 0 picks and tells the other ranks.
            init_method = f"file://{self._group_dir()}/rendezvous"
            plan_address = (f"ipc://{self._ipc_dir}/plan" if self.config.parallel.worker_transport == "ipc"
                            else f"tcp://127.0.0.1{ANY_PORT}")
            setups = [TPSetup(rank, size, init_method, plan_address) for rank in range(size)]
        self.followers = [LocalWorkerProcess(WorkerLaunch("follower", config_bytes, os.getpid(), device_ids[rank],
                                                     setups[rank]), f"{name}-rank{rank}")
                          for rank in range(1, size)]
        self.process = LocalWorkerProcess(
            WorkerLaunch("worker", config_bytes, os.getpid(), device_ids[0], setups[0], input_address,
                         output_address, **kv),
            f"{name}-rank0" if size > 1 else name)

    def _kv_address(self) -> str | None:
        """Where a decode group's KV inbox binds (tcp: a random port, reported when ready)."""
        if self.role != "decode":
            return None
        if self.config.parallel.worker_transport == "ipc":
            return f"ipc://{self._group_dir()}/kv"
        return "tcp://127.0.0.1:0"

    def _set_local_worker(self, worker: Any) -> None:
        self.local_worker = worker

    @property
    def pid(self) -> int | None:
        return getattr(self.process, "pid", None) or (os.getpid() if self.process else None)

    def exit_description(self) -> str:
        """Which process of the group ended, and how."""
        for rank, process in enumerate(self.processes):
            if isinstance(process, LocalWorkerProcess):
                if not process.has_ended():
                    continue
                process.join(1.0)   # reaped: its exit code known
            elif process.is_alive():
                continue
            code = getattr(process, "exitcode", None)
            where = f"worker {self.group_id}" + (f" rank {rank}" if self.followers else "")
            pid = getattr(process, "pid", None) or os.getpid()
            return f"{where} (pid {pid}) exited" + (
                f" with code {code}" if code is not None else "")
        return f"worker {self.group_id} (pid {self.pid}) exited"

    def watch(self, loop: asyncio.AbstractEventLoop, on_dead: Callable[[str], None]) -> None:
        if isinstance(self.process, threading.Thread):   # no sentinel to wait on
            self._poller = loop.create_task(self._poll(on_dead))
            return
        if any(process.sentinel is None for process in self.processes):   # a kernel without pidfds
            self._poller = loop.create_task(self._poll_processes(on_dead))
            return
        for process in self.processes:
            # Readable the moment the process ends, however it ends.
            loop.add_reader(process.sentinel, self._exited, on_dead)

    async def _poll(self, on_dead: Callable[[str], None]) -> None:
        while self.process.is_alive():
            await asyncio.sleep(THREAD_POLL_S)
        on_dead(self.exit_description())

    async def _poll_processes(self, on_dead: Callable[[str], None]) -> None:
        while all(process.is_alive() for process in self.processes):
            await asyncio.sleep(THREAD_POLL_S)
        self._poller = None   # ending by itself: nothing for unwatch to cancel
        self._exited(on_dead)

    def _exited(self, on_dead: Callable[[str], None]) -> None:
        self.unwatch()
        reason = self.exit_description()
        self.kill_processes()
        on_dead(reason)

    def unwatch(self) -> None:
        if self._poller is not None and not self._poller.done():
            try:
                self._poller.cancel()
            except RuntimeError:   # from a finalizer, after the event loop closed
                pass
        for process in self.processes:
            sentinel = getattr(process, "sentinel", None)
            if sentinel is not None:
                try:
                    asyncio.get_running_loop().remove_reader(sentinel)
                except (RuntimeError, ValueError, OSError):
                    pass

    def kill_processes(self) -> None:
        """End every rank still running (a group with a dead rank cannot step)."""
        for process in self.processes:
            if isinstance(process, LocalWorkerProcess):
                process.kill()

    def send(self, message: CoreToWorker) -> None:
        # PUSH to a connected peer with free high-water mark never blocks; a dead peer's
        # messages are dropped with it (its requests fail through the health monitor).
        if self.inbox is None or self.inbox.closed:
            return
        try:
            self._sender.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:   # no peer: the worker is gone
            pass

    def mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason

    async def shutdown(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.is_alive():
            try:
                self.send(Shutdown())
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout
            while (any(p.is_alive() for p in self.processes)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.02)
        self.kill()

    def kill(self) -> None:
        """Make sure the process is gone and the sockets closed (safe to call twice)."""
        self._stopped.set()
        self.unwatch()
        for process in self.processes:
            if isinstance(process, LocalWorkerProcess):
                process.kill()
                process.join(5)
                process.close()
        for sock in (self.inbox, self.outbox):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None
