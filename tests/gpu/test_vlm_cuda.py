"""On CUDA in bfloat16: Qwen2.5-VL through the engine against transformers on the same GPU.

A random checkpoint of a few hundred hidden units. The engine prepares and generates; the
reference is teacher-forced over the same ids with transformers' own image processor output.
Greedy tokens agree at every step where the reference's top-2 margin is clear of bfloat16
rounding noise, and the sampled tokens' log-probabilities agree closely.
"""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NEW_TOKENS = 48
CLEAR_MARGIN = 0.25   # logits
TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, initializer_range=0.04,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512,
              initializer_range=0.04)


def _image(seed: int, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


CASES = {"one_image": [_image(1, (64, 48))], "two_images": [_image(1, (64, 48)), _image(2, (40, 72))],
         "text_only": []}


def test_qwen2_5_vl_bfloat16_matches_transformers(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from streamvlm import LLM, SamplingParams
    from tests.checkpoints_qwen2_5_vl import build_qwen2_5_vl_checkpoint

    path = build_qwen2_5_vl_checkpoint(tmp_path / "qwen2_5_vl", text_config=TEXT, vision_config=VISION)
    # Zero LM-head rows for the vision tokens: greedy decoding never emits them, so the reference's
    # count of image tokens in the teacher-forced ids stays that of the prompt.
    saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for token in (saved.config.image_token_id, saved.config.vision_start_token_id,
                      saved.config.vision_end_token_id):
            saved.lm_head.weight[token] = 0
    saved.save_pretrained(path)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    takes_token_types = "mm_token_type_ids" in inspect.signature(ref.forward).parameters
    conversations = {name: [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                                         {"type": "text", "text": "Describe it."}]}]
                     for name, images in CASES.items()}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    with LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512, num_kv_blocks=256) as llm:
        outputs = llm.chat(list(conversations.values()), params)
    report = []
    for (name, images), out in zip(CASES.items(), outputs):
        ids = torch.tensor([out.prompt_token_ids + out.token_ids], device="cuda")
        kwargs = {}
        if images:
            pixels = processor(images=images, return_tensors="pt")
            kwargs = dict(pixel_values=pixels["pixel_values"].to("cuda", torch.bfloat16),
                          image_grid_thw=pixels["image_grid_thw"].to("cuda"))
            if takes_token_types:
                kwargs["mm_token_type_ids"] = (ids == ref.config.image_token_id).int()
        with torch.no_grad():
            logits = ref(input_ids=ids, **kwargs).logits[0, len(out.prompt_token_ids) - 1:-1].float()
        ref_logprobs = torch.log_softmax(logits, dim=-1)
        ours = torch.tensor([lp.logprob for lp in out.logprobs], device="cuda")
        theirs = ref_logprobs.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        top2 = logits.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        ref_greedy = logits.argmax(dim=-1).tolist()
        clear = [i for i, m in enumerate(margins) if m >= CLEAR_MARGIN]
        mismatches = [i for i in clear if ref_greedy[i] != out.token_ids[i]]
        max_diff = (ours - theirs).abs().max().item()
        report.append({"case": name, "prompt_tokens": len(out.prompt_token_ids),
                       "image_tokens": int((ids == ref.config.image_token_id).sum()),
                       "max_logprob_diff": round(max_diff, 4), "clear_steps": len(clear),
                       "mismatches_at_clear_steps": len(mismatches),
                       "equal_greedy_steps": sum(a == b for a, b in zip(ref_greedy, out.token_ids))})
        assert tokenizer.decode(out.prompt_token_ids).count("<|image_pad|>") == report[-1]["image_tokens"]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_vlm_vs_transformers.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    for row in report:
        assert row["mismatches_at_clear_steps"] == 0, row
        assert row["max_logprob_diff"] < 0.1, row
