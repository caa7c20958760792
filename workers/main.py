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
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.protocol import CoreToWorker, Heartbeat, Shutdown, StepOutput, WorkerFailed, WorkerReady
from workers.device_settings import DeviceSettings
from workers.core_link import IDLE_POLL_MS, OUTPUT_HWM, CoreGone, CoreLink, CoreOutbox, heartbeats_meanwhile
from workers.distributed import TPSetup
from workers.heap import settle_after_build
from workers.kv_transfer import KVInbox, KVOutbox, KVPeerLinks
from workers.parent import CoreWatch, EngineStopFlag, ParentWatch
from workers.rank_messages import KVShardPlan, StepPlan

# A remote follower's model before rank 0's config arrives: "take rank 0's".
RANK0_MODEL = "@rank0"


def run_worker(config_bytes: bytes, input_address: str, output_address: str,
               parent_pid: int | None, on_ready: Callable[[Any], None] | None = None,
               tp: TPSetup | None = None, device_index: int | None = None,
               kv_role: str = "mixed", kv_address: str | None = None, kv_group_id: int = -1,
               stopped: threading.Event | None = None) -> None:
    """The worker loop (rank 0 of its group). ``on_ready`` (thread backend only) receives the
    built Worker, and ``stopped`` (thread backend only) is set when the engine core lets the
    group go; ``tp`` makes this process rank 0 of a tensor-parallel group. ``parent_pid``
    None: a remote worker, with no parent to watch; it sends heartbeats and leaves when the
    engine core has been silent for remote_worker_timeout_s. ``kv_role`` "decode" binds a KV
    inbox at ``kv_address`` (prefill groups send prompts' KV blocks there); "prefill" gets the
    sockets to send them."""
    remote = parent_pid is None
    in_own_process = not remote and os.getpid() != parent_pid   # not the thread backend
    # First of all: from here the kernel ends this process with its parent.
    parent: CoreWatch | None = (ParentWatch(parent_pid) if in_own_process
                                else EngineStopFlag(stopped) if stopped is not None else None)
    if parent is not None and not parent.parent_alive():
        return
    if threading.current_thread() is threading.main_thread() and not remote:
        # Ctrl-C reaches the whole process group; the engine core decides when workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
    process = WorkerProcess(config, parent, remote)
    process.connect(input_address, output_address)
    if not process.build(tp, device_index):
        return
    process.wire_kv_transport(kv_role, kv_address, kv_group_id)
    if on_ready is not None:
        on_ready(process.worker)
    if in_own_process or remote:
        settle_after_build()
    process.serve()


class WorkerProcess:
    """Rank 0 of a worker group as a process: its sockets to the engine core, its Worker (and the
    plan publisher of a tensor-parallel group), the KV transport, and the loop serving them.
    ``parent``: the engine core's presence (the parent process, or with the thread backend the
    core's stop flag); None with ``remote``."""

    def __init__(self, config: EngineConfig, parent: CoreWatch | None, remote: bool) -> None:
        self.config = config
        self.parent = parent
        self.remote = remote
        self.ctx = zmq.Context()
        self.publisher: zmq.Socket | None = None
        self.kv_inbox: KVInbox | None = None
        self.kv_store_address: str | None = None

    def connect(self, input_address: str, output_address: str) -> None:
        config, parent = self.config, self.parent
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.RCVHWM, 0)   # requests queue here while a step runs; none is dropped
        self.inbox.connect(input_address)
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, OUTPUT_HWM)
        self.sock.connect(output_address)
        if self.remote:
            # A send the core has not taken within the timeout means the core is gone.
            self.outbox = CoreOutbox(self.sock, lambda waited: waited < config.parallel.remote_worker_timeout_s,
                                     min(config.parallel.remote_worker_timeout_s, IDLE_POLL_MS / 1000))
        elif parent is not None:
            self.outbox = CoreOutbox(self.sock, lambda waited: parent.parent_alive(),
                                     config.parallel.worker_parent_timeout_s)
        else:
            self.outbox = CoreOutbox(self.sock, lambda waited: True, config.parallel.worker_parent_timeout_s)

    def build(self, tp: TPSetup | None, device_index: int | None) -> bool:
        """The Worker, and for a tensor-parallel group the publisher of its step plans. A failure
        is reported to the core and the sockets closed: False."""
        try:
            if tp is not None:
                self.publisher = self.ctx.socket(zmq.PUB)
                self.publisher.bind(tp.plan_address)
            with heartbeats_meanwhile(self.sock if self.remote else None):
                self.worker = _build_worker(self.config, tp, device_index)
            if self.publisher is not None:
                publisher = self.publisher
                if tp.plan_address.endswith(ANY_PORT):
                    _share_plan_port(publisher)
                _handshake_followers(publisher)
                plan_encoder = msgspec.msgpack.Encoder()
                self.worker.runner.publish_plan = lambda plan: publisher.send(plan_encoder.encode(plan))
        except BaseException as exc:  # noqa: BLE001 - reported to the core, then exit
            _report_failure(self.outbox, WorkerFailed(error_type=type(exc).__name__,
                                                      message=str(exc) or traceback.format_exc()))
            self.inbox.close(linger=0)
            self.sock.close()
            self.ctx.destroy(linger=0)
            return False
        return True

    def wire_kv_transport(self, kv_role: str, kv_address: str | None, kv_group_id: int) -> None:
        """Disaggregated prefill/decode: a decode group's KV inbox, a prefill group's outbox, and
        with kv_transport "peer" the links the bytes take."""
        handoff = self.worker.kv_handoff
        if kv_role == "decode":
            self.kv_inbox = KVInbox(self.ctx, kv_address or "tcp://127.0.0.1:0")
        if kv_role == "prefill":
            handoff.outbox = KVOutbox(self.ctx)
        if kv_role != "mixed" and self.config.parallel.kv_transport == "peer":
            handoff.links = KVPeerLinks(kv_group_id, self.worker.runner.device, self.config.parallel.kv_transfer_timeout_s)
            if kv_role == "decode":
                self.kv_store_address = handoff.links.host()

    def serve(self) -> None:
        """Tell the core the worker is ready, then step until told to stop or the core is gone."""
        # Benchmarks: STREAMVLM_WORKER_PROFILE=PREFIX profiles the step loop (cProfile) into PREFIX.<pid>.
        profile_prefix = os.environ.get("STREAMVLM_WORKER_PROFILE")
        profiler = cProfile.Profile() if profile_prefix else None
        # Benchmarks: STREAMVLM_STEP_TRACE=PREFIX writes one line per step into PREFIX.<pid>.jsonl.
        trace_prefix = os.environ.get("STREAMVLM_STEP_TRACE")
        self.step_trace = StepTrace(f"{trace_prefix}.{os.getpid()}.jsonl") if trace_prefix else None
        # Benchmarks: STREAMVLM_STEP_TIMELINE=PREFIX[:FIRST:COUNT] records steps FIRST.. of the loop
        # (torch.profiler, host and device) into PREFIX.<pid>.json, a Chrome trace.
        timeline = os.environ.get("STREAMVLM_STEP_TIMELINE")
        self.step_timeline = StepTimeline.from_setting(timeline) if timeline else None
        worker = self.worker
        encoder = msgspec.msgpack.Encoder()
        link = CoreLink(self.inbox, self.config.parallel.remote_worker_timeout_s) if self.remote else None
        try:
            self.outbox.send(encoder.encode(WorkerReady(
                pid=os.getpid(), num_kv_blocks=worker.pool.num_blocks, device=str(worker.settings.device),
                dtype=str(worker.settings.dtype).removeprefix("torch."),
                attention_backend=worker.settings.attention_backend,
                async_scheduling=worker.settings.async_scheduling,
                kv_address=self.kv_inbox.address if self.kv_inbox else None,
                kv_store_address=self.kv_store_address)))
            if profiler is not None:
                profiler.enable()
            self._step_loop(encoder, link)
        except CoreGone:
            if self.remote:
                print("streamvlm worker: the engine core takes no messages; exiting", file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001
            _report_failure(self.outbox, WorkerFailed(error_type=type(exc).__name__,
                                                      message=traceback.format_exc()))
            raise
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile_prefix}.{os.getpid()}")
            if self.step_trace is not None:
                self.step_trace.close()
            if self.step_timeline is not None:
                self.step_timeline.close()
            self.close()

    def _step_loop(self, encoder: msgspec.msgpack.Encoder, link: CoreLink | None) -> None:
        worker, inbox, kv_inbox = self.worker, self.inbox, self.kv_inbox
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        if kv_inbox is not None:
            poller.register(kv_inbox.socket, zmq.POLLIN)
        decoder = msgspec.msgpack.Decoder(CoreToWorker)
        while True:
            # Every step, not only when idle: a busy worker must not outlive its core either.
            if self.parent is not None and not self.parent.parent_alive():
                return
            if link is not None and not link.core_alive():
                print("streamvlm worker: nothing from the engine core for "
                      f"{link.timeout_s:g} s; exiting", file=sys.stderr)
                return
            self.outbox.beat_if_quiet()
            timeout = 0 if worker.has_work() else IDLE_POLL_MS
            ready = dict(poller.poll(timeout))
            if kv_inbox is not None and kv_inbox.socket in ready:
                while (transfer := kv_inbox.receive()) is not None:
                    worker.receive_kv(*transfer)
            if inbox in ready:
                if link is not None:
                    link.last_heard = time.monotonic()
                if not self._handle_core_messages(decoder):
                    return
            elif not worker.has_work():
                if self.remote and self.publisher is not None:
                    self.publisher.send(_HELLO)   # ranks on other hosts hear rank 0 is alive
                continue
            if worker.has_work():
                started = time.monotonic()
                if self.step_timeline is not None:
                    self.step_timeline.before_step()
                out = worker.step()
                if self.step_trace is not None:
                    self.step_trace.record(started, time.monotonic(), out)
                if out.deltas or out.tokens or out.kv_events or out.stats.num_scheduled_tokens:
                    self.outbox.send(encoder.encode(out))

    def _handle_core_messages(self, decoder: msgspec.msgpack.Decoder) -> bool:
        """Every message waiting in the inbox, to the worker; False once told to shut down."""
        while True:
            try:
                message = decoder.decode(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                return True
            if isinstance(message, Shutdown):
                if self.publisher is not None:
                    self.publisher.send(msgspec.msgpack.encode(Shutdown()))
                return False
            if not isinstance(message, Heartbeat):
                self.worker.handle(message)

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.sock.close()
        if self.kv_inbox is not None:
            self.kv_inbox.close()
        if self.worker.kv_handoff.outbox is not None:
            self.worker.kv_handoff.outbox.close()
        if self.publisher is not None:
            self.publisher.close(linger=1000)
        self.ctx.term()


class StepTrace:
    """Host-side time and size of every step, one JSON line each: start and end (monotonic
    seconds), tokens scheduled, requests running, items encoded, deltas sent. With async
    scheduling a step's host time includes waiting for the step before's tokens, so in a steady
    stream it is the device's step time."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "w", buffering=1)  # noqa: SIM115 - line by line, read while it runs
        self.encoded = 0

    def record(self, started: float, ended: float, out: StepOutput) -> None:
        stats = out.stats
        encoded, self.encoded = stats.num_encoded_items - self.encoded, stats.num_encoded_items
        self.file.write(f"[{started:.6f}, {ended:.6f}, {stats.num_scheduled_tokens}, {stats.num_running}, "
                        f"{encoded}, {len(out.deltas) + len(out.tokens)}]\n")

    def close(self) -> None:
        self.file.close()


class StepTimeline:
    """A window of steps under torch.profiler (host ops and device kernels), each step marked
    ``step N``, written as a Chrome trace when the window ends (or the loop does)."""

    def __init__(self, path: str, first: int, count: int) -> None:
        self.path, self.first, self.count = path, first, count
        self.steps = 0
        self.profiler: Any = None
        self.mark: Any = None

    @classmethod
    def from_setting(cls, setting: str) -> StepTimeline:
        prefix, _, window = setting.partition(":")
        first, _, count = window.partition(":")
        if not (first or "1").isdigit() or not (count or "1").isdigit() or first == "0" or count == "0":
            raise ValueError(f"STREAMVLM_STEP_TIMELINE={setting!r}: expected PREFIX[:FIRST:COUNT] with step numbers "
                             "from 1")
        return cls(f"{prefix}.{os.getpid()}.json", int(first or 200), int(count or 50))

    def before_step(self) -> None:
        import torch

        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None
        self.steps += 1
        if self.steps == self.first:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
        if self.profiler is None:
            return
        if self.steps >= self.first + self.count:
            self.close()
            return
        self.mark = torch.profiler.record_function(f"step {self.steps}")
        self.mark.__enter__()

    def close(self) -> None:
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(self.path)
            self.profiler = None


def _report_failure(outbox: CoreOutbox, failure: WorkerFailed) -> None:
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
        timeout_s = runner.config.parallel.remote_worker_timeout_s
        while plans.recv() != _HELLO:
            pass
        dist.barrier()
        settle_after_build()
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
                     device_index: int | None) -> tuple[EngineConfig, Any, DeviceSettings]:
    """Pin the device, size the thread pool, join the tensor-parallel group; returns the config
    (resolved by the engine core; rank 0's, where the ranks share it), the model source and the
    device settings that every rank builds its model runner from."""
    import torch

    from streamvlm.contract.config import check_resolved
    from streamvlm.contract.model_source import resolve_model
    from workers.device_settings import resolve_device, resolve_for_device

    if device_index is not None and config.model.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(device_index)
    in_process = threading.current_thread() is not threading.main_thread()
    if not in_process and (config.model.device == "cpu" or not torch.cuda.is_available()):
        # Leave a core to the engine core's event loop where there are few.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
    if tp is not None:
        from workers.distributed import init_tensor_parallel
        device = resolve_device(config.model.device)   # the collective backend needs it first
        if device.type == "cpu":
            torch.set_num_threads(1)   # ranks share the host's cores
        init_tensor_parallel(tp, device)
        if tp.share_config:
            from workers.distributed import broadcast_config_bytes

            mine = msgspec.msgpack.encode(config) if tp.rank == 0 else None
            shared = msgspec.msgpack.decode(broadcast_config_bytes(mine), type=EngineConfig)
            # A host may name its own checkpoint path.
            model = shared.model.model if config.model.model == RANK0_MODEL else config.model.model
            config = shared.replace(model=model, devices=None)
    check_resolved(config)
    source = resolve_model(config.model.model)
    return config, source, resolve_for_device(config, source.hf_config, tp.size if tp else 1)


def _build_worker(config: EngineConfig, tp: TPSetup | None = None,
                  device_index: int | None = None):
    from workers.worker import Worker

    return Worker(*_prepare_process(config, tp, device_index))


def _build_follower_runner(config: EngineConfig, tp: TPSetup, device_index: int | None):
    """Followers hold a model shard and its KV cache, but no scheduler or block pool."""
    from workers.model_runner import ModelRunner

    return ModelRunner(*_prepare_process(config, tp, device_index))
