"""A local worker process: a fresh interpreter running workers.launch, and its exit.

Not multiprocessing: its spawn start method re-imports the user's __main__ in every child, so a
script without an `if __name__ == "__main__":` guard would start engines recursively, and code
from stdin or a notebook cell has no __main__ to import at all. Here the child imports only
the worker packages, and learns what to run from a WorkerLaunch on its stdin."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from workers.launch import WorkerLaunch


class LocalWorkerProcess:
    """A started worker process, with what the engine core's group watch needs: a sentinel
    file descriptor that becomes readable the moment the process ends (a pidfd), its liveness
    and exit code (negative: the signal that ended it, as multiprocessing reports it)."""

    def __init__(self, launch: WorkerLaunch, name: str) -> None:
        # Here, not at the top: importing the engine core loads no workers module.
        from workers import launch as worker_launch

        self.name = name
        workers_root = Path(worker_launch.__file__).resolve().parent.parent
        self._popen = subprocess.Popen([sys.executable, "-c", worker_launch.BOOTSTRAP],
                                       stdin=subprocess.PIPE, env=_child_environment(workers_root))
        self.pid = self._popen.pid
        # Before the child could exit and be reaped: the pid cannot have been reused yet.
        self.sentinel: int | None = _open_pidfd(self.pid)
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(msgspec.msgpack.encode(launch))
            self._popen.stdin.close()
        except BrokenPipeError:
            pass   # it died already: the sentinel and exitcode say so

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def has_ended(self) -> bool:
        """Ended, reaped or not (the sentinel is readable a moment before the exit code is)."""
        if self.sentinel is None:
            return not self.is_alive()
        # poll, not select: select() refuses descriptors past FD_SETSIZE (1024), and an engine
        # core with many sockets open reaches them.
        poller = select.poll()
        poller.register(self.sentinel, select.POLLIN)
        return bool(poller.poll(0))

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def close(self) -> None:
        """Release the sentinel; only once nothing watches it any more (a closed descriptor's
        number is soon another's)."""
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None

    def __del__(self) -> None:
        self.close()


def _open_pidfd(pid: int) -> int | None:
    """A descriptor readable once the process has ended; None where the kernel has none
    (before Linux 5.3, or not Linux): liveness is then polled."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _child_environment(workers_root: Path) -> dict[str, str]:
    """This process's environment, with the folders the worker and engine packages were
    imported from first on PYTHONPATH: the child finds the same code even where it is not
    installed."""
    streamvlm_root = Path(__file__).resolve().parents[2]
    roots = list(dict.fromkeys([str(workers_root), str(streamvlm_root)]))
    existing = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(roots + ([existing] if existing else []))}
