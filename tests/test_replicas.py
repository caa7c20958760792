"""Data-parallel replicas: worker groups with their own scheduler and KV pool behind one core."""

from __future__ import annotations

import asyncio
import os
import random
import signal


from streamvlm import AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from streamvlm.engine.router import GroupLoad, pick_group, prompt_block_hashes
from tests.helpers import child_pids, local_llm

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 440) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def test_router_prefers_least_loaded_then_cached_prefix():
    a, b = GroupLoad(), GroupLoad()
    hashes = prompt_block_hashes(list(range(64)), 16)
    assert len(hashes) == 4
    b.remember(hashes[:3])
    assert pick_group([a, b], hashes) == 1            # loads close: the cached prefix wins
    b.queued_prompt_tokens = 10_000
    assert pick_group([a, b], hashes) == 0            # far busier: load wins
    assert pick_group([a, GroupLoad()], []) == 0      # nothing cached: least loaded, first


def test_two_replicas_share_the_work_with_the_same_outputs(loop, llama_path):
    requests = prompts(64)
    with local_llm(llama_path, max_model_len=256) as llm:
        expected = [o.token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in requests], GREEDY, use_tqdm=False)]

    async def run():
        config = EngineConfig(model=str(llama_path), max_model_len=256, num_replicas=2)
        async with AsyncEngine(config) as engine:
            outs = await asyncio.gather(*(engine.generate({"prompt_token_ids": p}, GREEDY)
                                          for p in requests))
            health = await engine.health()
            stats = await engine.stats()
        return [o.token_ids for o in outs], health, stats

    got, health, stats = loop.run_until_complete(run())
    assert got == expected
    routed = [g.num_routed for g in health.groups]
    assert len(routed) == 2 and all(n > 0 for n in routed) and sum(routed) == 64, routed
    assert stats.kv_blocks_used == 0 and stats.num_requests == 0


def test_a_dead_replica_fails_only_its_own_requests(loop, llama_path):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        config = EngineConfig(model=str(llama_path), max_model_len=256, num_replicas=2)
        engine = AsyncEngine(config)
        await engine.start()
        try:
            tasks = [asyncio.ensure_future(engine.generate({"prompt_token_ids": p}, long))
                     for p in prompts(8)]
            while sum(engine.router.load(g.group_id).num_requests for g in engine.groups) < 8:
                await asyncio.sleep(0.01)
            victim = engine.groups[0]
            victim_requests = engine.router.load(victim.group_id).num_requests
            assert 0 < victim_requests < 8
            os.kill(victim.process.pid, signal.SIGKILL)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            dead = [r for r in results if isinstance(r, EngineDeadError)]
            done = [r for r in results if not isinstance(r, BaseException)]
            assert len(dead) == victim_requests and len(done) == 8 - victim_requests
            assert all(len(o.token_ids) == 200 for o in done)
            health = await engine.health()
            assert not health.healthy
            assert [g.alive for g in health.groups] == [False, True]
            assert "worker 0" in health.groups[0].error
            # New requests avoid the dead replica.
            out = await engine.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY)
            assert len(out.token_ids) == 12
        finally:
            await engine.shutdown()
        assert not child_pids()

    loop.run_until_complete(run())
