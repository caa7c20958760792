"""On CUDA: every Triton kernel variant the engine runs is compiled at start-up (the KV-sizing warm-up pass
and the CUDA graph captures), none in the middle of serving, whatever the batch sizes and prompt lengths:
a compile stalls every request of the step for a few hundred milliseconds."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _compiled_variants() -> dict[str, int]:
    from workers.kernels import decode_inputs, fused, kv_store, paged_attention, sampling

    counts = {}
    for module in (decode_inputs, fused, kv_store, paged_attention, sampling):
        for name in dir(module):
            kernel = getattr(module, name)
            caches = getattr(kernel, "device_caches", None)
            if caches is not None:
                counts[name] = sum(len(entry[0]) for entry in caches.values())
    assert counts, "no Triton JIT function found: the cache layout of this Triton version is unknown"
    return counts


def test_no_kernel_compiles_while_serving(tmp_path):
    from streamvlm import LLM, SamplingParams

    path = build_checkpoint(tmp_path / "qwen3", "qwen3", hidden_size=256, intermediate_size=704,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            max_position_embeddings=2048, head_dim=64)
    with LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=32,
             max_num_batched_tokens=512, gpu_memory_utilization=0.3, worker_backend="thread") as llm:
        after_start = _compiled_variants()
        g = torch.Generator().manual_seed(0)
        for batch in (1, 3, 5, 7, 19, 32):
            # Greedy and top_p rows beside plain sampled ones: every variant of the draw.
            temperatures = [0.0 if i % 3 == 1 else 0.7 for i in range(batch)]
            lengths = torch.randint(1, 700, (batch,), generator=g).tolist()
            prompts = [{"prompt_token_ids": torch.randint(3, 448, (n,), generator=g).tolist()} for n in lengths]
            outputs = torch.randint(1, 40, (batch,), generator=g).tolist()
            params = [SamplingParams(temperature=t, max_tokens=n, ignore_eos=True, top_p=0.9 if i % 4 == 2 else 1.0)
                      for i, (t, n) in enumerate(zip(temperatures, outputs))]
            llm.generate(prompts, params, use_tqdm=False)
        assert _compiled_variants() == after_start
