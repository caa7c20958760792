"""On CUDA in bfloat16: the engine against transformers on the same GPU.

Random checkpoints of a few hundred hidden units (the GPU machine has no model files). Logits
agree closely; greedy tokens agree at every step where transformers' own top-2 margin is clear
of bfloat16 rounding noise.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import ARCHS, build_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NEW_TOKENS = 48
CLEAR_MARGIN = 0.25   # logits
SIZES = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
             initializer_range=0.04)


def _backends() -> list:
    from workers.layers.attention import flash_attn_available

    has_flash = torch.cuda.is_available() and flash_attn_available(torch.device("cuda"))
    return ["triton", pytest.param("flash_attn", marks=pytest.mark.skipif(not has_flash,
                                                                          reason="needs flash-attn-4"))]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bfloat16_matches_transformers(arch, backend, tmp_path):
    from transformers import AutoModelForCausalLM

    from streamvlm import LLM, SamplingParams

    overrides = dict(SIZES, head_dim=128) if arch == "qwen3" else SIZES
    path = build_checkpoint(tmp_path / arch, arch, **overrides)
    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=1024, num_kv_blocks=512,
              attention_backend=backend)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 448, (n,), generator=g).tolist() for n in (5, 37, 160, 300)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            logprobs=True)
    with llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    report = []
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids + out.token_ids], device="cuda")
        with torch.no_grad():
            logits = ref(ids).logits[0, len(out.prompt_token_ids) - 1:-1].float()
        ref_logprobs = torch.log_softmax(logits, dim=-1)
        ours = torch.tensor([lp.logprob for lp in out.logprobs], device="cuda")
        chosen = torch.tensor(out.token_ids, device="cuda")[:, None]
        theirs = ref_logprobs.gather(1, chosen)[:, 0]
        top2 = logits.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        ref_greedy = logits.argmax(dim=-1).tolist()
        clear = [i for i, m in enumerate(margins) if m >= CLEAR_MARGIN]
        mismatches = [i for i in clear if ref_greedy[i] != out.token_ids[i]]
        max_diff = (ours - theirs).abs().max().item()
        report.append({"arch": arch, "backend": backend, "prompt_tokens": len(out.prompt_token_ids),
                       "max_logprob_diff": round(max_diff, 4), "clear_steps": len(clear),
                       "mismatches_at_clear_steps": len(mismatches),
                       "equal_greedy_steps": sum(a == b for a, b in zip(ref_greedy,
                                                                        out.token_ids))})
        assert not mismatches, mismatches
        assert max_diff < 0.1, max_diff
    if os.environ.get("OUT") and backend == "triton":
        with open(os.path.join(os.environ["OUT"], f"gpu_vs_transformers_{arch}.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
