"""Tensor parallelism on CPU (gloo): the same greedy tokens as one process, and a dead rank
fails its whole group cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from streamvlm import LLM, AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from tests.helpers import child_pids, run

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SHARED = list(range(100, 140))
PROMPTS = [[5, 6, 7], list(range(10, 27)), SHARED + [1, 2], SHARED + [3, 4, 5, 6, 7, 8, 9]]


def greedy(path, **kwargs) -> list[list[int]]:
    with LLM(str(path), max_model_len=256, block_size=8, max_num_batched_tokens=32,
             **kwargs) as llm:
        first = llm.generate({"prompt_token_ids": PROMPTS[2]}, GREEDY, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert rest[3].num_cached_tokens >= 32     # the shared prefix came from the cache
        return [o.token_ids for o in first + rest]


@pytest.mark.parametrize("arch, size", [("llama", 2), ("qwen3", 2), ("qwen2", 4)])
def test_tensor_parallel_gives_the_same_greedy_tokens(checkpoints, arch, size):
    # qwen2 at 4 ranks has 2 KV heads for 4 ranks: each KV head is replicated on two ranks.
    assert greedy(checkpoints[arch], tensor_parallel_size=size) == greedy(checkpoints[arch])


def test_tensor_parallel_over_tcp(checkpoints):
    # Rank 0 binds its plan publisher on a port the OS picks and tells the other ranks.
    path = checkpoints["llama"]
    assert greedy(path, tensor_parallel_size=2, worker_transport="tcp") == greedy(path)


def test_a_killed_rank_ends_the_group(loop, llama_path):
    long = SamplingParams(temperature=0, max_tokens=220, ignore_eos=True)

    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256,
                                          tensor_parallel_size=2))
        await engine.start()
        try:
            tasks = [asyncio.ensure_future(engine.generate({"prompt_token_ids": p}, long))
                     for p in PROMPTS]
            await asyncio.sleep(0.3)
            follower = engine.groups[0].followers[0]
            os.kill(follower.pid, signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert time.monotonic() - killed < 2.0
            assert all(isinstance(r, EngineDeadError) for r in results), results
            health = await engine.health()
            assert not health.healthy and "rank 1" in health.groups[0].error
            with pytest.raises(EngineDeadError):
                await engine.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY)
        finally:
            await engine.shutdown()
        assert not child_pids()

    run(loop, scenario())


def _vlm_checkpoint(name: str, path):
    if name == "qwen2_5_vl":
        from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint
        return build_qwen2_5_vl_checkpoint(path)
    if name == "qwen3_vl":
        from tests.checkpoints_qwen3_vl import build_qwen3_vl_checkpoint
        return build_qwen3_vl_checkpoint(path)
    from tests.checkpoints_llava import build_llava_checkpoint
    return build_llava_checkpoint(path, text="qwen3", vision="siglip")


def _vlm_greedy(path, **kwargs) -> list[list[int]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    cat, dog = (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(64, 48), (40, 56)])

    def chat(images, text):
        return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                             {"type": "text", "text": text}]}]
    conversations = [chat([cat], "What is this?"), chat([], "Only text."), chat([dog, cat], "Compare."),
                     chat([cat], "What is this?")]   # the last one hits the prefix cache
    with LLM(str(path), max_model_len=512, block_size=8, max_num_batched_tokens=32, **kwargs) as llm:
        first = llm.chat(conversations[0], GREEDY, use_tqdm=False)
        rest = llm.chat(conversations[1:], GREEDY, use_tqdm=False)
        assert rest[-1].num_cached_tokens >= 8
        return [o.token_ids for o in first + rest]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_tensor_parallel_vlm_gives_the_same_greedy_tokens(tmp_path, name):
    # Rank 0 runs the (replicated) vision tower and hands the embeddings to the other ranks.
    path = _vlm_checkpoint(name, tmp_path / name)
    assert _vlm_greedy(path, tensor_parallel_size=2) == _vlm_greedy(path)
