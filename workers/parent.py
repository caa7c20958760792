"""A local worker process's tie to the engine core that spawned it: it must not outlive it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Protocol

PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


class CoreWatch(Protocol):
    """Whether the engine core that runs this worker is still there."""

    def parent_alive(self) -> bool: ...


class EngineStopFlag:
    """The thread backend's tie to its engine core, which is this very process: the core sets
    the flag when it lets the group go (shut down, killed, or dropped). A worker thread blocked
    on a core that no longer reads would otherwise live on with its model and KV pool."""

    def __init__(self, stopped: threading.Event) -> None:
        self.stopped = stopped

    def parent_alive(self) -> bool:
        return not self.stopped.is_set()


class ParentWatch:
    """Whether the engine core that started this process is still its parent.

    On Linux the kernel also kills the process the moment its parent goes (PR_SET_PDEATHSIG),
    whatever the process is doing: inside a long step, a collective, a blocked send. The signal
    follows the death of the parent *thread* that spawned the process, which is the engine
    core's event-loop thread; the core stops its workers before that thread ends anyway."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        _kill_me_with_my_parent()

    def parent_alive(self) -> bool:
        # The parent may have died before the kernel was told: then this process was
        # re-parented already, and no signal will come.
        return os.getppid() == self.parent_pid


def _kill_me_with_my_parent() -> None:
    if not sys.platform.startswith("linux"):
        return   # elsewhere the step loop's parent_alive() checks are all there is
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
