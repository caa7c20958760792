"""Worker process entry: connect to the engine core over ZeroMQ and run the step loop.

Requests and aborts arrive on a PULL socket; every step that produced anything is sent back as
one StepOutput on a PUSH socket. The process leaves when told to, or when its parent is gone;
a remote worker (no parent: ``streamvlm worker --connect``) when the engine core falls silent.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import zmq

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.protocol import (HEARTBEAT_INTERVAL_S, CoreToWorker, Heartbeat, Shutdown, WorkerFailed,
                                         WorkerReady)
from workers.rank_messages import KVShardPlan, StepPlan
from workers.distributed import TPSetup
from workers.kv_transfer import KVInbox, KVOutbox, KVPeerLinks
from workers.parent import ParentWatch

IDLE_POLL_MS = 200
# A remote follower's model before rank 0's config arrives: "take rank 0's".
RANK0_MODEL = "@rank0"


# Step outputs queued for the engine core before a send waits: a core that stops reading (or is
# gone) must not make the worker buffer without bound.
OUTPUT_HWM = 64


class CoreGone(Exception):
    """The engine core is gone (or no longer takes messages): the worker leaves."""


class _CoreOutbox:
    """The worker's messages to the engine core (its PUSH socket). A send waits for room in the
    bounded queue only while ``core_present(seconds waited)`` says the core may still take it,
    and raises CoreGone otherwise. A Heartbeat goes out whenever nothing else did for about
    HEARTBEAT_INTERVAL_S: it comes from the step loop, so the core reads silence as a loop that
    is stuck (a local group) or gone (a remote one)."""

    def __init__(self, sock: zmq.Socket, core_present: Callable[[float], bool],
                 check_every_s: float) -> None:
        self.sock = sock
        self.core_present = core_present
        self.check_every_ms = max(1, int(check_every_s * 1000))
        self.heartbeat = msgspec.msgpack.encode(Heartbeat())
        self.last_sent = time.monotonic()

    def send(self, frame: bytes) -> None:
        start = time.monotonic()
        while True:
            if self.sock.poll(self.check_every_ms, zmq.POLLOUT):
                try:
                    self.sock.send(frame, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    pass   # the core's end went away between the poll and the send
            if not self.core_present(time.monotonic() - start):
                raise CoreGone
        self.last_sent = time.monotonic()

    def beat_if_quiet(self) -> None:
        # The loop comes by at least every IDLE_POLL_MS: send that much early to stay within.
        if time.monotonic() - self.last_sent >= HEARTBEAT_INTERVAL_S - IDLE_POLL_MS / 1000:
            self.send(self.heartbeat)


class _CoreLink:
    """A remote worker's view of the engine core: whether it was heard from in the timeout."""

    def __init__(self, inbox: zmq.Socket, timeout_s: float) -> None:
        self.inbox = inbox
        self.timeout_s = timeout_s
        self.last_heard = time.monotonic()

    def core_alive(self) -> bool:
        # After a step longer than the timeout, the core's heartbeats may be waiting unread.
        return time.monotonic() - self.last_heard < self.timeout_s or bool(self.inbox.poll(0))


@contextmanager
def _heartbeats_meanwhile(outbox: zmq.Socket | None) -> Iterator[None]:
    """Heartbeats from a thread while the main thread loads the model (minutes, for a large
    one). The thread is joined before the main thread touches the socket again."""
    if outbox is None:
        yield
        return
    stop = threading.Event()
    frame = msgspec.msgpack.encode(Heartbeat())

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL_S / 2):
            try:
                outbox.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass

    thread = threading.Thread(target=beat, name="streamvlm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_worker(config_bytes: bytes, input_address: str, output_address: str,
               parent_pid: int | None, on_ready: Callable[[Any], None] | None = None,
               tp: TPSetup | None = None, device_index: int | None = None,
               kv_role: str = "mixed", kv_address: str | None = None, kv_group_id: int = -1) -> None:
    """The worker loop (rank 0 of its group). ``on_ready`` (thread backend only) receives the
    built Worker; ``tp`` makes this process rank 0 of a tensor-parallel group. ``parent_pid``
    None: a remote worker, with no parent to watch; it sends heartbeats and leaves when the
    engine core has been silent for remote_worker_timeout_s. ``kv_role`` "decode" binds a KV
    inbox at ``kv_address`` (prefill groups send prompts' KV blocks there); "prefill" gets the
    sockets to send them."""
    remote = parent_pid is None
    in_own_process = not remote and os.getpid() != parent_pid   # not the thread backend
    # First of all: from here the kernel ends this process with its parent.
    parent = ParentWatch(parent_pid) if in_own_process else None
    if parent is not None and not parent.parent_alive():
        return
    if threading.current_thread() is threading.main_thread() and not remote:
        # Ctrl-C reaches the whole process group; the engine core decides when workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 0)   # requests queue here while a step runs; none is dropped
    inbox.connect(input_address)
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, OUTPUT_HWM)
    sock.connect(output_address)
    if remote:
        # A send the core has not taken within the timeout means the core is gone.
        outbox = _CoreOutbox(sock, lambda waited: waited < config.remote_worker_timeout_s,
                             min(config.remote_worker_timeout_s, IDLE_POLL_MS / 1000))
    elif parent is not None:
        outbox = _CoreOutbox(sock, lambda waited: parent.parent_alive(),
                             config.worker_parent_timeout_s)
    else:   # the thread backend: the core is this process
        outbox = _CoreOutbox(sock, lambda waited: True, config.worker_parent_timeout_s)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(CoreToWorker)
    publisher = None
    try:
        if tp is not None:
            publisher = ctx.socket(zmq.PUB)
            publisher.bind(tp.plan_address)
        with _heartbeats_meanwhile(sock if remote else None):
            worker = _build_worker(config, tp, device_index)
        if publisher is not None:
            if tp.plan_address.endswith(ANY_PORT):
                _share_plan_port(publisher)
            _handshake_followers(publisher)
            plan_encoder = msgspec.msgpack.Encoder()
            worker.runner.publish_plan = lambda plan: publisher.send(plan_encoder.encode(plan))
    except BaseException as exc:  # noqa: BLE001 - reported to the core, then exit
        _report_failure(outbox, WorkerFailed(error_type=type(exc).__name__,
                                             message=str(exc) or traceback.format_exc()))
        inbox.close(linger=0)
        sock.close()
        ctx.destroy(linger=0)
        return
    kv_inbox = KVInbox(ctx, kv_address or "tcp://127.0.0.1:0") if kv_role == "decode" else None
    if kv_role == "prefill":
        worker.kv_handoff.outbox = KVOutbox(ctx)
    kv_store_address = None
    if kv_role != "mixed" and config.kv_transport == "peer":
        worker.kv_handoff.links = KVPeerLinks(kv_group_id, worker.runner.device, config.kv_transfer_timeout_s)
        if kv_role == "decode":
            kv_store_address = worker.kv_handoff.links.host()
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    if kv_inbox is not None:
        poller.register(kv_inbox.socket, zmq.POLLIN)
    if on_ready is not None:
        on_ready(worker)
    # Benchmarks: STREAMVLM_WORKER_PROFILE=PREFIX profiles the step loop (cProfile) into PREFIX.<pid>.
    profile_prefix = os.environ.get("STREAMVLM_WORKER_PROFILE")
    profiler = cProfile.Profile() if profile_prefix else None
    link = _CoreLink(inbox, config.remote_worker_timeout_s) if remote else None
    try:
        outbox.send(encoder.encode(WorkerReady(pid=os.getpid(), num_kv_blocks=worker.pool.num_blocks,
                                               device=str(worker.runner.device),
                                               kv_address=kv_inbox.address if kv_inbox else None,
                                               kv_store_address=kv_store_address)))
        if profiler is not None:
            profiler.enable()
        while True:
            # Every step, not only when idle: a busy worker must not outlive its core either.
            if parent is not None and not parent.parent_alive():
                return
            if link is not None and not link.core_alive():
                print("streamvlm worker: nothing from the engine core for "
                      f"{link.timeout_s:g} s; exiting", file=sys.stderr)
                return
            outbox.beat_if_quiet()
            timeout = 0 if worker.has_work() else IDLE_POLL_MS
            ready = dict(poller.poll(timeout))
            if kv_inbox is not None and kv_inbox.socket in ready:
                while (transfer := kv_inbox.receive()) is not None:
                    worker.receive_kv(*transfer)
            if inbox in ready:
                if link is not None:
                    link.last_heard = time.monotonic()
                while True:
                    try:
                        message = decoder.decode(inbox.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if isinstance(message, Shutdown):
                        if publisher is not None:
                            publisher.send(msgspec.msgpack.encode(Shutdown()))
                        return
                    if not isinstance(message, Heartbeat):
                        worker.handle(message)
            elif not worker.has_work():
                if remote and publisher is not None:
                    publisher.send(_HELLO)   # ranks on other hosts hear rank 0 is alive
                continue
            if worker.has_work():
                out = worker.step()
                if out.deltas or out.kv_events or out.stats.num_scheduled_tokens:
                    outbox.send(encoder.encode(out))
    except CoreGone:
        if remote:
            print("streamvlm worker: the engine core takes no messages; exiting", file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001
        _report_failure(outbox, WorkerFailed(error_type=type(exc).__name__,
                                             message=traceback.format_exc()))
        raise
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_prefix}.{os.getpid()}")
        inbox.close(linger=0)
        sock.close()
        if kv_inbox is not None:
            kv_inbox.close()
        if worker.kv_handoff.outbox is not None:
            worker.kv_handoff.outbox.close()
        if publisher is not None:
            publisher.close(linger=1000)
        ctx.term()


def _report_failure(outbox: _CoreOutbox, failure: WorkerFailed) -> None:
    try:
        outbox.send(msgspec.msgpack.encode(failure))
    except CoreGone:
        pass   # nobody left to tell


_HELLO = b"hello"
ANY_PORT = ":*"


def _share_plan_port(publisher: zmq.Socket) -> None:
    """Rank 0: the port the OS gave the plan publisher, to every rank (see _plan_address)."""
    from workers.distributed import broadcast_int

    endpoint = publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    broadcast_int(int(endpoint.rpartition(":")[2]))


def _plan_address(address: str) -> str:
    """The other ranks: where rank 0 publishes, its port taken from rank 0 where not given."""
    from workers.distributed import broadcast_int

    if not address.endswith(ANY_PORT):
        return address
    return f"{address.removesuffix(ANY_PORT)}:{broadcast_int(0)}"


def _handshake_followers(publisher: zmq.Socket) -> None:
    """PUB drops messages until a subscriber's subscription arrives: say hello until every
    follower has heard one and joined the barrier."""
    import time

    import torch.distributed as dist

    joined = dist.barrier(async_op=True)
    while not joined.is_completed():
        publisher.send(_HELLO)
        time.sleep(0.01)
    joined.wait()


def run_follower(config_bytes: bytes, tp: TPSetup, parent_pid: int | None,
                 device_index: int | None = None) -> None:
    """Ranks 1..T-1 of a tensor-parallel group: run each step plan rank 0 publishes.
    ``parent_pid`` None: a rank on another host; it leaves when rank 0 has published nothing
    (rank 0 says hello when idle) for remote_worker_timeout_s."""
    remote = parent_pid is None
    parent = None if remote else ParentWatch(parent_pid)
    if parent is not None and not parent.parent_alive():
        return
    if not remote:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch.distributed as dist

    config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
    ctx = zmq.Context()
    plans = ctx.socket(zmq.SUB)
    plans.setsockopt(zmq.SUBSCRIBE, b"")
    decoder = msgspec.msgpack.Decoder(StepPlan | KVShardPlan | Shutdown)
    try:
        runner = _build_follower_runner(config, tp, device_index)
        # Rank 0 says hello until every rank has heard it: connecting late loses nothing.
        plans.connect(_plan_address(tp.plan_address))
        timeout_s = runner.config.remote_worker_timeout_s
        while plans.recv() != _HELLO:
            pass
        dist.barrier()
        last_heard = time.monotonic()
        while True:
            if parent is not None and not parent.parent_alive():
                return
            if not plans.poll(IDLE_POLL_MS):
                if remote and time.monotonic() - last_heard > timeout_s:
                    print(f"streamvlm worker: nothing from rank 0 for {timeout_s:g} s; exiting",
                          file=sys.stderr)
                    return
                continue
            last_heard = time.monotonic()
            frame = plans.recv()
            if frame == _HELLO:
                continue
            plan = decoder.decode(frame)
            if isinstance(plan, Shutdown):
                return
            if isinstance(plan, KVShardPlan):
                runner.kv_memory.run_plan(plan)
            else:
                runner.follow(plan)
    finally:
        plans.close(linger=0)
        ctx.term()


def _prepare_process(config: EngineConfig, tp: TPSetup | None,
                     device_index: int | None) -> tuple[EngineConfig, Any, int]:
    """Pin the device, size the thread pool, join the tensor-parallel group; returns the config
    (rank 0's, where the ranks share it), the model source and max_model_len that every rank
    builds its model runner from."""
    import torch

    from streamvlm.inputs.processor import resolve_max_model_len
    from streamvlm.contract.model_source import resolve_model

    if device_index is not None and config.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(device_index)
    in_process = threading.current_thread() is not threading.main_thread()
    if not in_process and (config.device == "cpu" or not torch.cuda.is_available()):
        # Leave a core to the engine core's event loop where there are few.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
    if tp is not None:
        from workers.distributed import init_tensor_parallel
        from workers.model_runner import resolve_device
        device = resolve_device(config.device)
        if device.type == "cpu":
            torch.set_num_threads(1)   # ranks share the host's cores
        init_tensor_parallel(tp, device)
        if tp.share_config:
            from workers.distributed import broadcast_config_bytes

            mine = msgspec.msgpack.encode(config) if tp.rank == 0 else None
            shared = msgspec.msgpack.decode(broadcast_config_bytes(mine), type=EngineConfig)
            # A host may name its own checkpoint path.
            model = shared.model if config.model == RANK0_MODEL else config.model
            config = msgspec.structs.replace(shared, model=model, devices=None)
    source = resolve_model(config.model)
    return config, source, resolve_max_model_len(config, source.text_config)


def _build_worker(config: EngineConfig, tp: TPSetup | None = None,
                  device_index: int | None = None):
    from workers.worker import Worker

    return Worker(*_prepare_process(config, tp, device_index))


def _build_follower_runner(config: EngineConfig, tp: TPSetup, device_index: int | None):
    """Followers hold a model shard and its KV cache, but no scheduler or block pool."""
    from workers.model_runner import ModelRunner

    return ModelRunner(*_prepare_process(config, tp, device_index))
