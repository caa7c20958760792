"""Worker groups on other hosts: `streamvlm worker --connect` joins a running engine core and is
routed to like a local replica; liveness both ways is heard from heartbeats."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from streamvlm import AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from tests.helpers import local_llm, run
from tests.test_replicas import GREEDY, prompts

TIMEOUT_S = 2.0
REPO = Path(__file__).resolve().parents[1]


def remote_config(model: Path) -> EngineConfig:
    # The local group runs in a thread: fast to start, and its own requests still finish
    # when the remote one dies. Port 0: the OS picks the listen port (no race for a free one).
    return EngineConfig(model=str(model), max_model_len=256, num_replicas=1,
                        worker_backend="thread", remote_worker_groups=1,
                        worker_listen_address="tcp://127.0.0.1:0",
                        remote_worker_timeout_s=TIMEOUT_S)


async def start_listening(engine: AsyncEngine) -> asyncio.Future:
    """Start the engine and return once it listens for remote workers; the returned future
    completes when they have joined and the engine has started."""
    starting = asyncio.ensure_future(engine.start())
    while engine.worker_listen_address is None:
        if starting.done():
            starting.result()   # start-up failed before it listened: raise why
        await asyncio.sleep(0.01)
    return starting


@contextmanager
def spawned(*args: str) -> Iterator[subprocess.Popen]:
    """A Python subprocess that never outlives the test."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def remote_worker(address: str) -> AbstractContextManager[subprocess.Popen]:
    return spawned("-m", "streamvlm.cli", "worker", "--connect", address, "--join-timeout", "60")


@asynccontextmanager
async def joined(config: EngineConfig) -> AsyncIterator[tuple[AsyncEngine, subprocess.Popen]]:
    """A started engine whose remote group is a `streamvlm worker` process, and that process."""
    engine = AsyncEngine(config)
    starting = await start_listening(engine)
    with remote_worker(engine.worker_listen_address) as worker:
        try:
            await starting
            yield engine, worker
        finally:
            await engine.shutdown()


def wait_exit(proc: subprocess.Popen, within: float) -> float:
    """Seconds until ``proc`` exits; fails past ``within``."""
    start = time.monotonic()
    proc.wait(timeout=within)
    return time.monotonic() - start


def test_a_remote_group_shares_the_work_with_the_same_outputs(loop, llama_path):
    requests = prompts(32)
    with local_llm(llama_path, max_model_len=256) as llm:
        expected = [o.token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in requests], GREEDY, use_tqdm=False)]

    async def serve() -> tuple[list[list[int]], object, subprocess.Popen]:
        async with joined(remote_config(llama_path)) as (engine, worker):
            outs = await asyncio.gather(*(engine.generate({"prompt_token_ids": p}, GREEDY)
                                          for p in requests))
            health = await engine.health()
            # A clean shutdown tells the remote worker to leave: it does not wait out its
            # timeout of silence (the bound only catches one that stays; load may slow its exit).
            await engine.shutdown()
            wait_exit(worker, within=60)
            assert "nothing from the engine core" not in worker.stderr.read()
        return [o.token_ids for o in outs], health, worker

    got, health, worker = run(loop, serve(), timeout=120)
    assert got == expected
    assert health.healthy
    assert [g.group_id for g in health.groups] == [0, 1]
    assert health.groups[0].host is None and health.groups[1].host == socket.gethostname()
    assert health.groups[1].pid == worker.pid
    routed = [g.num_routed for g in health.groups]
    assert all(n > 0 for n in routed) and sum(routed) == 32, routed
    assert worker.returncode == 0


# SIGKILL drops the connection; SIGSTOP keeps it open but silent (only the timeout tells).
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_dead_remote_worker_fails_only_its_own_requests(loop, llama_path, how):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def serve() -> None:
        async with joined(remote_config(llama_path)) as (engine, worker):
            tasks = [asyncio.ensure_future(engine.generate({"prompt_token_ids": p}, long))
                     for p in prompts(8)]
            while sum(engine.router.load(g.group_id).num_requests for g in engine.groups) < 8:
                await asyncio.sleep(0.01)
            remote = engine.groups[1]
            victims = engine.router.load(remote.group_id).num_requests
            assert 0 < victims < 8
            os.kill(worker.pid, how)
            killed = time.monotonic()
            failed_at: list[float] = []

            async def outcome(task: asyncio.Future) -> object:
                try:
                    return await task
                except EngineDeadError as exc:
                    failed_at.append(time.monotonic() - killed)
                    return exc

            results = await asyncio.gather(*(outcome(t) for t in tasks))
            dead = [r for r in results if isinstance(r, EngineDeadError)]
            done = [r for r in results if not isinstance(r, BaseException)]
            assert len(dead) == victims and len(done) == 8 - victims
            assert max(failed_at) < TIMEOUT_S + 2, failed_at
            assert all(len(o.token_ids) == 200 for o in done)
            health = await engine.health()
            assert not health.healthy
            assert [g.alive for g in health.groups] == [True, False]
            assert "remote worker group 1" in health.groups[1].error
            if how == signal.SIGSTOP:
                assert "sent nothing for" in health.groups[1].error
            # New requests avoid the dead group.
            outs = await asyncio.gather(*(engine.generate({"prompt_token_ids": p}, GREEDY)
                                          for p in prompts(4)))
            assert all(len(o.token_ids) == 12 for o in outs)
            assert engine.router.load(engine.groups[1].group_id).num_routed == victims

    run(loop, serve(), timeout=120)


CORE = textwrap.dedent("""
    import asyncio, sys
    from streamvlm import AsyncEngine, EngineConfig
    from streamvlm.engine.loop import new_event_loop

    async def main():
        config = EngineConfig(model=sys.argv[1], max_model_len=256, worker_backend="thread",
                              remote_worker_groups=1, worker_listen_address="tcp://127.0.0.1:0",
                              remote_worker_timeout_s=float(sys.argv[2]))
        engine = AsyncEngine(config)
        starting = asyncio.ensure_future(engine.start())
        while engine.worker_listen_address is None:
            await asyncio.sleep(0.01)
        print(engine.worker_listen_address, flush=True)
        async with engine:
            await starting
            print("ready", flush=True)
            await asyncio.sleep(3600)

    new_event_loop().run_until_complete(main())
""")


def test_a_remote_worker_leaves_when_its_core_dies(llama_path):
    with spawned("-c", CORE, str(llama_path), str(TIMEOUT_S)) as core:
        address = core.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), core.stderr.read()
        with remote_worker(address) as worker:
            assert core.stdout.readline().strip() == "ready", core.stderr.read()
            assert worker.poll() is None
            core.kill()
            core.wait()
            # Not before its timeout of silence (give or take a poll); the bound above only catches
            # a worker that stays (a loaded machine may take seconds to schedule its exit).
            assert wait_exit(worker, within=TIMEOUT_S + 60) >= TIMEOUT_S - 1.5
            assert "nothing from the engine core" in worker.stderr.read()


def test_late_workers_are_refused_and_bad_configs_name_the_field(loop, llama_path):
    with pytest.raises(ValueError, match="worker_listen_address"):
        EngineConfig(remote_worker_groups=1)
    with pytest.raises(ValueError, match="worker_listen_address"):
        EngineConfig(remote_worker_groups=1, worker_listen_address="127.0.0.1:7000")
    with pytest.raises(ValueError, match="remote_worker_groups"):
        EngineConfig(remote_worker_groups=-1)
    with pytest.raises(ValueError, match="remote_worker_timeout_s"):
        EngineConfig(remote_worker_timeout_s=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(remote_worker_groups=1, worker_listen_address="tcp://127.0.0.1:7000",
                     tensor_parallel_size=2)

    from workers.remote import join_engine

    async def serve() -> None:
        async with joined(remote_config(llama_path)) as (engine, _):
            # A second worker for the one remote group is turned away, not left waiting.
            with pytest.raises(RuntimeError, match="have joined"):
                await asyncio.to_thread(join_engine, engine.worker_listen_address, 10)

    run(loop, serve(), timeout=120)


def test_the_worker_command_refuses_bad_arguments():
    from streamvlm.cli import main

    assert main(["worker", "--connect", "localhost:7000"]) == 2
    assert main(["worker", "--connect", "tcp://127.0.0.1:1", "--devices", "0,1"]) == 2
    with socket.socket() as bound:
        # Bound and never listening: nobody answers at this port while the command runs.
        bound.bind(("127.0.0.1", 0))
        silent = f"tcp://127.0.0.1:{bound.getsockname()[1]}"
        assert main(["worker", "--connect", silent, "--join-timeout", "0.2"]) == 1


def test_a_tensor_parallel_group_across_hosts(loop, checkpoints):
    """Rank 0 joins the core, rank 1 joins rank 0 (torch.distributed rendezvous, gloo) and takes
    its config: the same tokens as one local replica; a dead rank 1 ends the group, not the core."""
    path = checkpoints["qwen3"]
    requests = prompts(16)
    with local_llm(path, max_model_len=256) as llm:
        expected = [o.token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in requests], GREEDY, use_tqdm=False)]

    async def serve() -> tuple:
        engine = AsyncEngine(remote_config(path))
        starting = await start_listening(engine)
        # Rendezvous port 0: rank 0 picks one and says which; rank 1 joins it there.
        with spawned("-m", "streamvlm.cli", "worker", "--connect", engine.worker_listen_address,
                     "--tensor-parallel-size", "2", "--dist-init-method", "tcp://127.0.0.1:0",
                     "--join-timeout", "60") as rank0:
            init = await asyncio.wait_for(asyncio.to_thread(announced_rendezvous, rank0), 120)
            with spawned("-m", "streamvlm.cli", "worker", "--follow", init, "--rank", "1",
                         "--tensor-parallel-size", "2", "--device", "cpu") as follower:
                try:
                    await starting
                    outs = await asyncio.gather(*(engine.generate({"prompt_token_ids": p}, GREEDY)
                                                  for p in requests))
                    routed = [g.num_routed for g in (await engine.health()).groups]
                    follower.kill()
                    long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
                    results = await asyncio.gather(*(engine.generate({"prompt_token_ids": p}, long)
                                                     for p in prompts(8)), return_exceptions=True)
                    health = await engine.health()
                finally:
                    await engine.shutdown()
            wait_exit(rank0, within=30)
        return [o.token_ids for o in outs], routed, results, health

    got, routed, results, health = run(loop, serve(), timeout=180)
    assert got == expected
    assert all(n > 0 for n in routed), routed
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed and all(isinstance(r, EngineDeadError) for r in failed), results
    assert not health.groups[1].alive and health.groups[0].alive


def announced_rendezvous(rank0: subprocess.Popen) -> str:
    """The rendezvous address rank 0 prints when it picks the port."""
    seen = []
    for line in rank0.stderr:
        seen.append(line)
        if "tensor-parallel rendezvous at " in line:
            return line.split(" at ", 1)[1].strip()
    raise AssertionError("rank 0 never announced its rendezvous:\n" + "".join(seen))


def test_worker_follow_needs_a_rank():
    done = subprocess.run([sys.executable, "-m", "streamvlm.cli", "worker", "--follow",
                           "tcp://127.0.0.1:1", "--tensor-parallel-size", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--rank" in done.stderr
