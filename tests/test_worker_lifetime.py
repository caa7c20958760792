"""Worker processes never outlive their engine core, whatever they are doing when it dies, and
a worker whose step loop stops making progress is reported and routed around."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from streamvlm import AsyncEngine, EngineConfig, SamplingParams
from streamvlm.errors import EngineUnresponsiveError
from tests.conftest import build_checkpoint
from tests.helpers import run

REPO = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 30.0
LONG_CONTEXT = 65536


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has) (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not running(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory) -> Path:
    """Room for a generation that keeps a CPU worker busy for minutes."""
    return build_checkpoint(tmp_path_factory.mktemp("long") / "llama", "llama",
                            max_position_embeddings=LONG_CONTEXT)


CORE = textwrap.dedent("""
    import asyncio, sys
    from streamvlm import AsyncEngine, EngineConfig, SamplingParams
    from streamvlm.engine.loop import new_event_loop

    async def main(busy, tensor_parallel_size):
        config = EngineConfig(model=sys.argv[1], worker_backend="process", device="cpu",
                              num_kv_blocks=4200, max_num_batched_tokens=64,
                              tensor_parallel_size=tensor_parallel_size)
        async with AsyncEngine(config) as engine:
            print(*(p.pid for p in engine.groups[0].processes), flush=True)
            if busy:
                params = SamplingParams(max_tokens=65000, ignore_eos=True)
                asyncio.ensure_future(engine.generate({"prompt_token_ids": [5, 6, 7]}, params))
                while (await engine.stats()).num_running < 1:
                    await asyncio.sleep(0.05)
                print("busy", flush=True)
            await asyncio.sleep(3600)

    if __name__ == "__main__":
        new_event_loop().run_until_complete(main(sys.argv[2] == "busy", int(sys.argv[3])))
""")


# Tensor-parallel ranks 1.. are the core's children too, and follow rank 0's steps.
@pytest.mark.parametrize("state, tensor_parallel_size", [("idle", 1), ("busy", 1), ("busy", 2)])
def test_workers_exit_when_their_core_is_killed(long_llama, state, tensor_parallel_size):
    core = subprocess.Popen([sys.executable, "-c", CORE, str(long_llama), state,
                             str(tensor_parallel_size)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker_pids: list[int] = []
    try:
        line = core.stdout.readline().split()
        assert line and all(p.isdigit() for p in line), (
            core.stderr.read() if core.poll() is not None else line)
        worker_pids = [int(p) for p in line]
        assert len(worker_pids) == tensor_parallel_size
        if state == "busy":
            assert core.stdout.readline().strip() == "busy"
        assert all(running(pid) for pid in worker_pids)
        core.kill()
        core.wait(30)
        for pid in worker_pids:
            assert wait_gone(pid, GONE_WITHIN_S), f"worker {pid} outlived its core"
    finally:
        if core.poll() is None:
            core.kill()
        # Before reading the core's pipes to the end: a worker left behind holds them open.
        for pid in worker_pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        core.communicate(timeout=30)


def test_a_thread_worker_leaves_when_its_group_is_let_go_mid_generation(loop, llama_path):
    """The thread backend has no parent process to lose: a group killed without a shutdown (an
    engine dropped, say) while its worker generates must still end the worker thread, which
    would otherwise wait forever on a core that no longer reads."""
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(llama_path), worker_backend="thread",
                                          max_model_len=256))
        await engine.start()
        group = engine.groups[0]
        thread = group.process
        stream = engine.stream("Hello", SamplingParams(max_tokens=240, ignore_eos=True))
        await stream.__anext__()
        group.kill()   # no Shutdown message: only the stop flag tells the worker
        await asyncio.sleep(0)
        await stream.aclose()
        await engine.shutdown()
        return thread

    thread = run(loop, main())
    thread.join(GONE_WITHIN_S)
    assert not thread.is_alive()


def test_a_dead_worker_is_noticed_with_descriptors_past_1024_open(loop, llama_path):
    """An engine core with many descriptors open gets worker sentinels numbered past select()'s
    FD_SETSIZE: their death must still be seen."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < 1400:
        pytest.skip("needs at least 1400 open files")
    pipes = [os.pipe() for _ in range(550)]

    async def main():
        engine = AsyncEngine(EngineConfig(model=str(llama_path), worker_backend="process",
                                          device="cpu", max_model_len=256))
        await engine.start()
        try:
            process = engine.groups[0].process
            assert process.sentinel is None or process.sentinel >= 1024
            os.kill(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + GONE_WITHIN_S
            while (await engine.health()).groups[0].alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            health = await engine.health()
            assert not health.groups[0].alive and "exited" in health.groups[0].error
        finally:
            await engine.shutdown()

    try:
        run(loop, main())
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)


def test_socket_folders_of_dead_cores_are_removed_at_start(loop, llama_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = tempfile.gettempdir()
    # Owners: a process that has exited, this live one, and no pid at all.
    stale = tempfile.mkdtemp(prefix=f"streamvlm-{dead.pid}-")
    Path(stale, "out").touch()
    live = tempfile.mkdtemp(prefix=f"streamvlm-{os.getpid()}-")
    unnamed = tempfile.mkdtemp(prefix="streamvlm-", dir=tmp)
    try:
        async def start() -> None:
            async with AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256,
                                                worker_backend="thread")):
                pass

        run(loop, start())
        assert not os.path.exists(stale)
        assert os.path.isdir(live) and os.path.isdir(unnamed)
    finally:
        for path in (stale, live, unnamed):
            if os.path.isdir(path):
                os.rmdir(path)


def test_a_stopped_worker_is_unhealthy_and_routed_around_until_it_resumes(loop, llama_path):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    config = EngineConfig(model=str(llama_path), max_model_len=256, device="cpu", num_replicas=2,
                          worker_step_timeout_s=3.0)

    async def wait_for(engine: AsyncEngine, condition, within: float = 30.0):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            health = await engine.health()
            if condition(health):
                return health
            await asyncio.sleep(0.1)
        raise AssertionError(f"health never changed as expected: {health}")

    async def generate(engine: AsyncEngine, n: int) -> list[int]:
        outs = await asyncio.gather(*(engine.generate({"prompt_token_ids": [5 + i, 6, 7]}, greedy)
                                      for i in range(n)))
        return [len(o.token_ids) for o in outs]

    async def scenario(engine: AsyncEngine, stopped: list[int]) -> None:
        first, second = (g.pid for g in engine.groups)
        assert await generate(engine, 4) == [8] * 4
        os.kill(first, signal.SIGSTOP)
        stopped.append(first)
        health = await wait_for(engine, lambda h: not h.groups[0].responsive)
        assert not health.healthy and health.groups[0].alive and health.groups[1].responsive
        assert "no progress for" in health.groups[0].error
        routed = engine.router.load(engine.groups[0].group_id).num_routed
        assert await generate(engine, 4) == [8] * 4
        assert engine.router.load(engine.groups[0].group_id).num_routed == routed   # all went to the other group

        os.kill(second, signal.SIGSTOP)
        stopped.append(second)
        await wait_for(engine, lambda h: not any(g.responsive for g in h.groups))
        started = time.monotonic()
        with pytest.raises(EngineUnresponsiveError, match="worker_step_timeout_s"):
            await engine.generate({"prompt_token_ids": [5, 6, 7]}, greedy)
        assert time.monotonic() - started < 5

        for pid in (first, second):
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        health = await wait_for(engine, lambda h: h.healthy)
        assert all(g.alive and g.responsive and g.error is None for g in health.groups)
        assert await generate(engine, 4) == [8] * 4

    async def main() -> None:
        stopped: list[int] = []
        async with AsyncEngine(config) as engine:
            try:
                await scenario(engine, stopped)
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)

    run(loop, main(), timeout=240)


def test_the_timeouts_must_be_positive_and_above_the_heartbeat():
    with pytest.raises(ValueError, match="worker_parent_timeout_s"):
        EngineConfig(worker_parent_timeout_s=0)
    with pytest.raises(ValueError, match="worker_step_timeout_s"):
        EngineConfig(worker_step_timeout_s=1.0)   # the heartbeat interval: it would flap
    assert EngineConfig(worker_step_timeout_s=1.5).parallel.worker_step_timeout_s == 1.5
