"""The entry of a local worker process: started by the engine core as a fresh interpreter
(never a fork, never a re-import of the user's __main__), it reads what to run from stdin.

The engine core writes one msgpack-encoded WorkerLaunch to the process's stdin and closes it;
the process then runs rank 0 of a group (run_worker) or a tensor-parallel follower
(run_follower) exactly as if it had been called with those arguments."""

from __future__ import annotations

import sys
from typing import Literal

import msgspec

from workers.distributed import TPSetup


class WorkerLaunch(msgspec.Struct, frozen=True):
    """One worker process's arguments: see workers.main.run_worker and run_follower."""

    entry: Literal["worker", "follower"]
    config_bytes: bytes
    parent_pid: int
    device_index: int | None = None
    tp: TPSetup | None = None
    # rank 0 only
    input_address: str = ""
    output_address: str = ""
    kv_role: str = "mixed"
    kv_address: str | None = None
    kv_group_id: int = -1


# Run with `python -c`: drop the working directory the interpreter puts first on sys.path, so
# that a user's own `workers` or `streamvlm` folder cannot shadow the packages.
BOOTSTRAP = ("import sys\n"
             "if not getattr(sys.flags, 'safe_path', False): del sys.path[0]\n"
             "from workers.launch import main\n"
             "main()\n")


def run(launch: WorkerLaunch) -> None:
    from workers.main import run_follower, run_worker

    if launch.entry == "follower":
        assert launch.tp is not None
        run_follower(launch.config_bytes, launch.tp, launch.parent_pid, launch.device_index)
        return
    run_worker(launch.config_bytes, launch.input_address, launch.output_address, launch.parent_pid,
               None, launch.tp, launch.device_index, kv_role=launch.kv_role,
               kv_address=launch.kv_address, kv_group_id=launch.kv_group_id)


def main() -> None:
    launch = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=WorkerLaunch)
    run(launch)


if __name__ == "__main__":
    main()
