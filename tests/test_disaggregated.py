"""Disaggregated prefill/decode through the engine: prefill groups compute prompts and first
tokens and hand the KV blocks to decode groups, giving exactly the tokens of one mixed group;
aborts, timeouts and dead groups leave no block held on either side."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streamvlm import AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from tests.helpers import child_pids, run

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SHARED = list(range(100, 140))
PROMPTS = [[5, 6, 7], list(range(10, 45)), SHARED + [1, 2], SHARED + [3, 4, 5, 6, 7, 8, 9],
           list(range(200, 290))]
OPTIONS = dict(max_model_len=256, block_size=8, max_num_batched_tokens=32, num_kv_blocks=128)


def engine(path, groups: Any = None, **overrides: Any) -> AsyncEngine:
    options = {**OPTIONS, "worker_backend": "thread", **overrides}
    return AsyncEngine(EngineConfig(model=str(path), groups=groups, **options))


async def outputs(eng: AsyncEngine, prompts: list[Any], params: SamplingParams = GREEDY,
                  chat: bool = False) -> list[list[int]]:
    # The first prompt alone first, so that the others can hit its prefix in both caches.
    first = await eng.generate(prompts[0] if chat else {"prompt_token_ids": prompts[0]}, params)
    rest = await asyncio.gather(*(eng.generate(p if chat else {"prompt_token_ids": p}, params)
                                  for p in prompts[1:]))
    return [o.token_ids for o in [first, *rest]]


def held_blocks(eng: AsyncEngine) -> list[int]:
    """Blocks each group's worker holds for live requests (thread backend)."""
    return [sum(1 for r in g.local_worker.pool.ref_counts if r) for g in eng.groups]


async def wait_released(eng: AsyncEngine, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = held_blocks(eng)
        if not any(held) and not any(g.local_worker.sequences for g in eng.groups):
            return held
        await asyncio.sleep(0.02)
    return held_blocks(eng)


@pytest.fixture(scope="module")
def mixed_tokens(loop, checkpoints):
    async def scenario():
        async with engine(checkpoints["qwen3"]) as eng:
            return await outputs(eng, PROMPTS)
    return run(loop, scenario())


@pytest.mark.parametrize("transport", ["zmq", "peer"])
@pytest.mark.parametrize("groups", [["prefill", "decode"], ["prefill", "decode", "decode"]],
                         ids=["1p1d", "1p2d"])
def test_prefill_decode_gives_the_tokens_of_one_mixed_group(loop, checkpoints, mixed_tokens, groups, transport):
    async def scenario():
        async with engine(checkpoints["qwen3"], groups, kv_transport=transport) as eng:
            got = await outputs(eng, PROMPTS)
            stats = await eng.stats()
            health = await eng.health()
            page = eng.metrics.render(stats).decode()
            return (got, stats, health, await wait_released(eng), [eng.router.load(g.group_id).num_routed for g in eng.groups],
                    page)
    got, stats, health, held, routed, page = run(loop, scenario())
    assert f"streamvlm:kv_transfers_total {float(len(PROMPTS))}" in page
    assert f"streamvlm:kv_transfer_bytes_total {float(stats.kv_transfer_bytes)}" in page
    assert got == mixed_tokens
    assert stats.kv_transfers == len(PROMPTS) and stats.kv_transfer_bytes > 0
    assert stats.kv_transfer_seconds > 0
    assert [g.role for g in health.groups] == groups
    assert held == [0] * len(groups)
    if len(groups) == 3:
        assert routed[1] and routed[2]   # both decode groups got work


HANDOFF_PROMPTS = [[3 + i, 60 + 2 * i, 7, 150 + i] for i in range(24)]
FEW = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


async def streamed_tokens(eng: AsyncEngine, prompt: list[int]) -> list[int]:
    return [t async for delta in eng.stream({"prompt_token_ids": prompt}, FEW) for t in delta.token_ids]


@pytest.fixture(scope="module")
def mixed_handoff_tokens(loop, checkpoints):
    async def scenario():
        async with engine(checkpoints["qwen3"]) as eng:
            return await asyncio.gather(*(streamed_tokens(eng, p) for p in HANDOFF_PROMPTS))
    return run(loop, scenario())


@pytest.mark.parametrize("transport", ["zmq", "peer"])
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_many_concurrent_handoffs_stream_their_tokens_in_order(loop, checkpoints, mixed_handoff_tokens,
                                                               backend, transport):
    """The prefill group's first token and the decode group's second reach the core from two
    groups; whichever comes first, the stream delivers them in order."""
    async def scenario():
        async with engine(checkpoints["qwen3"], ["prefill", "decode"], kv_transport=transport,
                          worker_backend=backend) as eng:
            got = await asyncio.gather(*(streamed_tokens(eng, p) for p in HANDOFF_PROMPTS))
            return got, (await eng.stats()).num_requests
    got, num_requests = run(loop, scenario(), timeout=120)
    assert got == mixed_handoff_tokens
    assert all(len(tokens) == FEW.max_tokens for tokens in got)
    assert num_requests == 0


@pytest.mark.parametrize("transport", ["zmq", "peer"])
def test_a_first_token_that_arrives_after_the_second_still_streams_first(loop, checkpoints, transport):
    """The prefill group's step output lags behind its KV: the decode group's tokens (even its
    finish) reach the core first, and wait for the first token. The late "prefilled" event
    starts no transfer timer for a request already handed off."""
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def scenario(groups, **overrides):
        async with engine(checkpoints["qwen3"], groups, **overrides) as eng:
            if groups:
                prefill = eng.groups[0].local_worker
                step = prefill.step

                def late_step():   # the worker's thread: the KV is on its way, the first token waits
                    out = step()
                    if any(d.new_token_ids for d in out.request_deltas()):
                        time.sleep(0.2)
                    return out
                prefill.step = late_step
                decode = eng.groups[1].local_worker
                decode_step = decode.step

                def slow_step():   # the long request still decodes when "prefilled" comes
                    if decode.scheduler.running:
                        time.sleep(0.005)
                    return decode_step()
                decode.step = slow_step
            async def deltas_of(params):
                return [d async for d in eng.stream({"prompt_token_ids": PROMPTS[1]}, params)]
            deltas = await asyncio.gather(deltas_of(GREEDY), deltas_of(long))
            return deltas, (await eng.stats()).num_requests, await wait_released(eng)
    (mixed, _), _, _ = run(loop, scenario(None))
    (short, long_deltas), num_requests, held = run(
        loop, scenario(["prefill", "decode"], kv_transport=transport, kv_transfer_timeout_s=0.05))
    assert [t for d in short for t in d.token_ids] == [t for d in mixed for t in d.token_ids]
    assert [d.finish_reason for d in short][-1] == "length"
    assert [d.finish_reason for d in long_deltas].count(None) == len(long_deltas) - 1
    assert long_deltas[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in long_deltas) == long.max_tokens
    assert num_requests == 0 and held == [0, 0]


def test_decode_side_prefix_cache_means_fewer_bytes(loop, checkpoints):
    async def scenario():
        async with engine(checkpoints["qwen3"], ["prefill", "decode"]) as eng:
            await eng.generate({"prompt_token_ids": SHARED + [1]}, GREEDY)
            first = (await eng.stats()).kv_transfer_bytes
            await eng.generate({"prompt_token_ids": SHARED + [2]}, GREEDY)
            return first, (await eng.stats()).kv_transfer_bytes - first
    first, second = run(loop, scenario())
    assert 0 < second < first / 4   # 40 shared tokens: 5 cached blocks of 6 are not sent again


def test_streaming_starts_with_the_prefill_groups_first_token(loop, checkpoints, mixed_tokens):
    """The decode group holds the KV back: the first token streams anyway, from the prefill group."""
    async def scenario():
        async with engine(checkpoints["qwen3"], ["prefill", "decode"]) as eng:
            decode = eng.groups[1].local_worker
            receive, step, has_work = decode.receive_kv, decode.step, decode.has_work
            held: list[Any] = []
            released = False

            def held_step():   # runs in the worker's thread: the held KV lands there, in order
                if released:
                    while held:
                        receive(*held.pop(0))
                return step()
            decode.receive_kv = lambda *transfer: held.append(transfer)
            decode.step = held_step
            decode.has_work = lambda: (released and bool(held)) or has_work()
            stream = eng.stream({"prompt_token_ids": PROMPTS[1]}, GREEDY)
            first = await asyncio.wait_for(stream.__anext__(), 10)
            assert first.token_ids == mixed_tokens[1][:1] and first.finish_reason is None
            deadline = time.monotonic() + 5
            while not any(header.last for header, _ in held) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert held and not decode.scheduler.running   # nothing to decode before the KV lands
            released = True
            rest = [t async for delta in stream for t in delta.token_ids]
            return first.token_ids + rest
    assert run(loop, scenario()) == mixed_tokens[1]


def test_abort_during_the_transfer_frees_both_sides(loop, checkpoints):
    async def scenario():
        async with engine(checkpoints["qwen3"], ["prefill", "decode"]) as eng:
            decode = eng.groups[1].local_worker
            decode.receive_kv = lambda *transfer: None      # the KV never lands
            stream = eng.stream({"prompt_token_ids": PROMPTS[4]}, GREEDY, request_id="r")
            await asyncio.wait_for(stream.__anext__(), 10)  # prefilled: both sides hold blocks
            await asyncio.sleep(0.1)
            assert all(held_blocks(eng))
            await eng.abort("r")
            await stream.aclose()
            return await wait_released(eng)
    assert run(loop, scenario()) == [0, 0]


def test_a_transfer_that_never_completes_fails_the_request(loop, checkpoints):
    async def scenario():
        async with engine(checkpoints["qwen3"], ["prefill", "decode"], kv_transfer_timeout_s=0.5) as eng:
            eng.groups[1].local_worker.receive_kv = lambda *transfer: None
            start = time.monotonic()
            out = await eng.generate({"prompt_token_ids": PROMPTS[1]}, GREEDY)
            elapsed = time.monotonic() - start
            ok = await eng.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=1))
            return out, elapsed, ok, await wait_released(eng)
    out, elapsed, ok, held = run(loop, scenario())
    assert out.finish_reason == "error" and "did not complete in 0.5 s" in out.error
    assert elapsed < 3
    assert ok.finish_reason == "length"   # a one-token request needs no handoff
    assert held == [0, 0]


def test_a_killed_decode_group_fails_its_requests_and_the_prefill_group_frees(loop, checkpoints):
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def scenario():
        options = {**OPTIONS, "max_model_len": 512, "num_kv_blocks": 512}
        eng = AsyncEngine(EngineConfig(model=str(checkpoints["qwen3"]), groups=["prefill", "decode", "decode"],
                                       **options))
        await eng.start()
        try:
            streams = [eng.stream({"prompt_token_ids": p}, long) for p in PROMPTS]
            # Every request has its first token: handed off, or about to be.
            firsts = [(await asyncio.wait_for(stream.__anext__(), 10)).token_ids for stream in streams]

            async def drain(first, stream):
                return first + [t async for delta in stream for t in delta.token_ids]
            tasks = [asyncio.ensure_future(drain(f, s)) for f, s in zip(firsts, streams)]
            victim = eng.groups[1]
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failed_within = time.monotonic() - killed
            health = await eng.health()
            await asyncio.sleep(0.3)
            prefill_stats = eng.groups[0].stats
            after = await eng.generate({"prompt_token_ids": PROMPTS[1]}, GREEDY)
            return results, failed_within, health, prefill_stats, after
        finally:
            await eng.shutdown()

    results, failed_within, health, prefill_stats, after = run(loop, scenario())
    dead = [r for r in results if isinstance(r, EngineDeadError)]
    assert dead and all(isinstance(r, EngineDeadError) or len(r) == long.max_tokens for r in results)
    assert failed_within < 60
    assert not health.groups[1].alive and health.groups[2].alive
    assert prefill_stats.num_used_blocks == 0 and prefill_stats.num_handoffs_held == 0
    assert len(after.token_ids) == GREEDY.max_tokens
    assert not child_pids()


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_vlm_requests_through_prefill_and_decode(loop, tmp_path):
    from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint

    path = build_qwen2_5_vl_checkpoint(tmp_path / "vl")
    cat, dog = _image(1, (64, 48)), _image(2, (40, 72))

    def chat(images, text):
        return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                             {"type": "text", "text": text}]}]
    conversations = [chat([cat], "What is it?"), chat([], "Just text."), chat([dog, cat], "Compare."),
                     chat([cat], "What is it?")]

    async def scenario(groups):
        async with engine(path, groups, max_model_len=512, num_kv_blocks=256) as eng:
            got = await outputs(eng, conversations, chat=True)
            stats = await eng.stats()
            return got, stats
    mixed, _ = run(loop, scenario(None))
    split, stats = run(loop, scenario(["prefill", "decode"]))
    assert split == mixed
    assert stats.kv_transfers == len(conversations)
    assert stats.num_encoded_items == 2   # images encoded by the prefill group only, once each


def test_group_config_errors():
    with pytest.raises(ValueError, match="both prefill and decode"):
        EngineConfig(groups=["prefill", "mixed"])
    with pytest.raises(ValueError, match="the same tensor_parallel_size"):
        EngineConfig(groups=[{"role": "prefill", "tensor_parallel_size": 2}, "decode"])
    with pytest.raises(ValueError, match="worker_backend='process'"):
        EngineConfig(groups=[{"role": "prefill", "tensor_parallel_size": 2},
                             {"role": "decode", "tensor_parallel_size": 2}], worker_backend="thread")
    with pytest.raises(ValueError, match="groups: "):
        EngineConfig(groups=[{"role": "prefil"}, "decode"])
    with pytest.raises(ValueError, match="kv_transfer_timeout_s"):
        EngineConfig(kv_transfer_timeout_s=0)
    spec = EngineConfig.from_kwargs(groups=[{"role": "prefill", "devices": [0]}, "decode"]).parallel.groups
    assert [g.role for g in spec] == ["prefill", "decode"] and spec[0].devices == [0]


@pytest.mark.parametrize("arch, transport", [("qwen3", "zmq"), ("qwen2", "peer")])
def test_tensor_parallel_prefill_and_decode_groups(loop, checkpoints, arch, transport):
    """Groups of 2 ranks (gloo): each rank's KV shard goes to the same rank of the decode group.
    qwen2's 2 KV heads split one per rank; qwen3 has as many."""
    async def scenario(groups):
        eng = AsyncEngine(EngineConfig(model=str(checkpoints[arch]), groups=groups, kv_transport=transport,
                                       **OPTIONS))
        async with eng:
            got = await outputs(eng, PROMPTS)
            return got, await eng.stats()
    mixed, _ = run(loop, scenario(None))
    split, stats = run(loop, scenario([{"role": "prefill", "tensor_parallel_size": 2},
                                       {"role": "decode", "tensor_parallel_size": 2}]), timeout=120)
    assert split == mixed
    assert stats.kv_transfers == len(PROMPTS)
    assert not child_pids()


def test_peer_link_abort_keeps_the_link_in_order(loop, checkpoints, mixed_tokens):
    """kv_transport "peer": a transfer for a request the decode side aborted is still taken off
    the link, so the next request's blocks arrive whole."""
    async def scenario():
        async with engine(checkpoints["qwen3"], ["prefill", "decode"], kv_transport="peer") as eng:
            decode = eng.groups[1].local_worker
            stream = eng.stream({"prompt_token_ids": PROMPTS[4]}, GREEDY, request_id="gone")
            await asyncio.wait_for(stream.__anext__(), 10)
            await eng.abort("gone")
            await stream.aclose()
            out = await eng.generate({"prompt_token_ids": PROMPTS[1]}, GREEDY)
            return out.token_ids, await wait_released(eng), decode.kv_handoff.bytes_received
    tokens, held, received = run(loop, scenario())
    assert tokens == mixed_tokens[1]
    assert held == [0, 0] and received > 0
