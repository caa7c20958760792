"""A worker's links to the engine core: its bounded outbox with heartbeats, and (remote workers)
whether the core was heard from lately."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec
import zmq

from streamvlm.contract.protocol import HEARTBEAT_INTERVAL_S, Heartbeat

# How long the step loop waits for a message when it has no work; the heartbeat is due that much
# early.
IDLE_POLL_MS = 200

# Step outputs queued for the engine core before a send waits: a core that stops reading (or is
# gone) must not make the worker buffer without bound.
OUTPUT_HWM = 64


class CoreGone(Exception):
    """The engine core is gone (or no longer takes messages): the worker leaves."""


class CoreOutbox:
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


class CoreLink:
    """A remote worker's view of the engine core: whether it was heard from in the timeout."""

    def __init__(self, inbox: zmq.Socket, timeout_s: float) -> None:
        self.inbox = inbox
        self.timeout_s = timeout_s
        self.last_heard = time.monotonic()

    def core_alive(self) -> bool:
        # After a step longer than the timeout, the core's heartbeats may be waiting unread.
        return time.monotonic() - self.last_heard < self.timeout_s or bool(self.inbox.poll(0))


@contextmanager
def heartbeats_meanwhile(outbox: zmq.Socket | None) -> Iterator[None]:
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
