"""On CUDA: decode steps replayed from CUDA graphs give the tokens of eager steps, for batch
sizes on and between the captured buckets and past the largest, greedy and seeded sampling, text
and M-RoPE models.

In float32 (no TF32), so that the comparison is exact: in bfloat16 a graph's padded batch may take
another GEMM kernel than the eager batch, and prefill chunking varies with arrival timing, which
moves near-tied greedy picks (the engine-level bfloat16 checks against transformers cover that)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SIZES = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.04)


def _outputs(path, prompts, params, **config):
    from streamvlm import LLM

    with LLM(str(path), device="cuda", dtype="float32", max_model_len=1024, num_kv_blocks=2048,
             max_num_seqs=32, **config) as llm:
        stats = llm.stats()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert stats.kv_blocks_total == 2048
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("num_prompts", [1, 3, 19])
def test_graphs_match_eager(tmp_path, num_prompts):
    from streamvlm import SamplingParams

    path = build_checkpoint(tmp_path / "qwen3", "qwen3", **SIZES, head_dim=64)
    g = torch.Generator().manual_seed(num_prompts)
    prompts = [torch.randint(3, 448, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 300, (num_prompts,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=40, ignore_eos=True)
              for i in range(num_prompts)]
    eager = _outputs(path, prompts, params, enforce_eager=True)
    graphs = _outputs(path, prompts, params, enforce_eager=False, max_cuda_graph_batch_size=16)
    assert graphs == eager


def test_graphs_match_eager_across_decode_spans(tmp_path):
    """Decodes whose contexts cross a decode span (512 keys, at max_model_len 1,024) mid-request replay the
    next span's graph from then on, with the eager tokens."""
    from streamvlm import SamplingParams

    path = build_checkpoint(tmp_path / "qwen3", "qwen3", **SIZES, head_dim=64)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 448, (n,), generator=g).tolist() for n in (495, 480, 20)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    eager = _outputs(path, prompts, params, enforce_eager=True)
    assert _outputs(path, prompts, params, enforce_eager=False, max_cuda_graph_batch_size=16) == eager
    assert _outputs(path, prompts[:1], params[:1], enforce_eager=False, max_cuda_graph_batch_size=16) == eager[:1]


def test_graphs_serve_an_mrope_model(tmp_path):
    from streamvlm import LLM, SamplingParams
    from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint

    path = build_qwen2_5_vl_checkpoint(tmp_path / "vl")
    conv = [{"role": "user", "content": [{"type": "image", "image": _image()},
                                         {"type": "text", "text": "Describe it."}]}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        with LLM(str(path), device="cuda", dtype="float32", max_model_len=512, num_kv_blocks=256,
                 enforce_eager=eager) as llm:
            results.append(llm.chat(conv, params)[0].token_ids)
    assert results[0] == results[1]


def _image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_async_scheduling_matches_synchronous_steps(tmp_path):
    """Step N+1 queued behind step N, its tokens read on the device, gives the synchronous tokens: greedy,
    seeded, penalties (those steps wait for the tokens), stop tokens that end requests mid-flight."""
    from streamvlm import SamplingParams

    path = build_checkpoint(tmp_path / "qwen3", "qwen3", **SIZES, head_dim=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 448, (int(n),), generator=g).tolist() for n in torch.randint(4, 300, (24,), generator=g)]
    probe = _outputs(path, prompts[:1], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)],
                     async_scheduling=False)[0]
    # Prompt 0 stops at the first token of its greedy stream, past the 6th, that is new to it.
    stop_at = next(i for i in range(6, len(probe)) if probe[i] not in probe[:i])
    kinds = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[probe[stop_at]], ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=33, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=25, repetition_penalty=1.2, ignore_eos=True)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    sync = _outputs(path, prompts, params, async_scheduling=False)
    ahead = _outputs(path, prompts, params, async_scheduling=True)
    assert len(sync[0]) == stop_at + 1
    assert ahead == sync
