"""The engine against transformers on tiny random Llama / Qwen2 / Qwen3 checkpoints (CPU).

Greedy token ids must equal transformers' greedy decoding token for token, and the logits of
every position (whole, chunked, batched) must match transformers' to float32 precision, also
under prefix-cache hits, chunked prefill and preemption. Then other dtypes, dummy weights,
checkpoint loading errors and bad inputs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import local_llm, wait_idle, worker_of
from streamvlm.engine.llm import LLM
from streamvlm.contract.sampling import SamplingParams
from tests.conftest import ARCHS, VOCAB, hf_model
from workers.scheduler import ScheduledChunk
from workers.sequence import Sequence

ARCH_NAMES = list(ARCHS)
BLOCK = 8
NUM_NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
# Prompt lengths: a single token, just over one block, over two blocks, almost four blocks.
LENGTHS = [1, 9, 17, 30]


def random_prompts(seed: int, lengths: Iterable[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def as_inputs(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


def assert_idle(llm: LLM) -> None:
    """No request left in the worker and no KV block held (cached blocks with ref 0 are fine)."""
    worker = wait_idle(llm)
    assert not worker.sequences
    assert not worker.scheduler.has_work()
    assert not any(worker.pool.ref_counts), worker.pool.ref_counts
    assert worker.pool.num_free_blocks == worker.pool.num_blocks


def record_stats(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """StepStats of every worker step that LLM.generate makes from now on."""
    stats: list[Any] = []
    step = worker_of(llm).step

    def recording_step():
        out = step()
        stats.append(out.stats)
        return out

    monkeypatch.setattr(worker_of(llm), "step", recording_step)
    return stats


class Reference:
    """transformers models of the tiny checkpoints, with memoised greedy decoding."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.models: dict[str, Any] = {}
        self.greedy_cache: dict[tuple, list[int]] = {}

    def model(self, arch: str) -> Any:
        if arch not in self.models:
            self.models[arch] = hf_model(self.paths[arch])
        return self.models[arch]

    @torch.inference_mode()
    def greedy(self, arch: str, prompt: list[int], num_tokens: int) -> list[int]:
        """Manual greedy loop over transformers' KV cache, EOS ignored."""
        key = (arch, tuple(prompt), num_tokens)
        if key not in self.greedy_cache:
            model = self.model(arch)
            out = model(torch.tensor([prompt]), use_cache=True)
            tokens: list[int] = []
            while True:
                tokens.append(int(out.logits[0, -1].argmax()))
                if len(tokens) == num_tokens:
                    break
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                            use_cache=True)
            self.greedy_cache[key] = tokens
        return self.greedy_cache[key]

    @torch.inference_mode()
    def logits(self, arch: str, token_ids: list[int]) -> torch.Tensor:
        return self.model(arch)(torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> Reference:
    return Reference(checkpoints)


def make_llm(path: Path, **kwargs: Any) -> LLM:
    return local_llm(path, **{"max_model_len": 256, "block_size": BLOCK, **kwargs})


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def engine_logits(llm: LLM, requests: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Teacher-forced logits of every position, through the worker's pool and runner.

    Each request is (token_ids, chunk_lengths). Step i runs the i-th chunk of every request that
    has one, all in one batch, so later chunks attend to the blocks cached by earlier steps and
    a step can mix long chunks with single tokens.
    """
    pool, runner = worker_of(llm).pool, worker_of(llm).runner
    seqs = []
    for i, (token_ids, chunks) in enumerate(requests):
        assert sum(chunks) == len(token_ids)
        seqs.append(Sequence(f"teacher-{i}", token_ids, SamplingParams(), [], i))
    rows: list[list[torch.Tensor]] = [[] for _ in requests]
    try:
        for step in range(max(len(c) for _, c in requests)):
            scheduled = []
            for i, (seq, (_, chunks)) in enumerate(zip(seqs, requests)):
                if step < len(chunks):
                    assert pool.allocate(seq, chunks[step])
                    scheduled.append((i, ScheduledChunk(seq, seq.num_computed_tokens,
                                                        chunks[step])))
            logits = runner.forward_all_logits([c for _, c in scheduled])
            assert logits.dtype == torch.float32
            assert logits.shape == (sum(c.num_tokens for _, c in scheduled), VOCAB)
            for (i, chunk), part in zip(scheduled, logits.split([c.num_tokens
                                                                  for _, c in scheduled])):
                rows[i].append(part)
                chunk.seq.num_computed_tokens += chunk.num_tokens
    finally:
        for seq in seqs:
            pool.free_sequence(seq)
    return [torch.cat(r) for r in rows]


def chunk_lengths(total: int, pattern: str) -> list[int]:
    if pattern == "whole":
        return [total]
    if pattern == "decode":      # a prefill, then one token per step
        return [min(20, total)] + [1] * max(0, total - 20)
    # "unaligned": chunk edges inside blocks; "blocks": chunk edges on block edges.
    sizes = {"unaligned": [5, 11, 3, 13], "blocks": [BLOCK, 2 * BLOCK]}[pattern]
    out: list[int] = []
    while sum(out) < total:
        out.append(min(sizes[len(out) % len(sizes)], total - sum(out)))
    return out


# --- greedy and teacher-forced logits -------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_matches_transformers(arch: str, checkpoints, reference: Reference) -> None:
    llm = make_llm(checkpoints[arch])
    prompts = random_prompts(1, LENGTHS)
    outputs = llm.generate(as_inputs(prompts), GREEDY)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length"
        assert out.token_ids == reference.greedy(arch, prompt, NUM_NEW), len(prompt)
    assert_idle(llm)


@pytest.mark.parametrize("pattern", ["whole", "unaligned", "blocks", "decode"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_teacher_forced_logits(arch: str, pattern: str, checkpoints,
                               reference: Reference) -> None:
    llm = make_llm(checkpoints[arch])
    prompt = random_prompts(1, [30])[0]
    token_ids = prompt + reference.greedy(arch, prompt, NUM_NEW)
    [logits] = engine_logits(llm, [(token_ids, chunk_lengths(len(token_ids), pattern))])
    expected = reference.logits(arch, token_ids)
    assert_close_logits(logits, expected)
    # The greedy path is the argmax of its own logits.
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == token_ids[len(prompt):]
    assert_idle(llm)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_teacher_forced_logits_batched(arch: str, checkpoints, reference: Reference) -> None:
    """Several sequences per step, each at its own point: whole, unaligned chunks, decodes."""
    llm = make_llm(checkpoints[arch])
    prompts = random_prompts(2, [30, 9, 17, 1])
    token_ids = [p + reference.greedy(arch, p, NUM_NEW) for p in prompts]
    patterns = ["unaligned", "whole", "decode", "blocks"]
    results = engine_logits(llm, [(ids, chunk_lengths(len(ids), pattern))
                                  for ids, pattern in zip(token_ids, patterns)])
    for ids, logits in zip(token_ids, results):
        assert_close_logits(logits, reference.logits(arch, ids))
    assert_idle(llm)


# --- prefix caching, chunked prefill, preemption -------------------------------------------


def expected_hit_tokens(cached: list[int], prompt: list[int]) -> int:
    """Tokens of prompt served by the cached full blocks of another sequence's tokens."""
    common = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        common += 1
    return min(common // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_prefix_cache_hits(arch: str, checkpoints, reference: Reference) -> None:
    llm = make_llm(checkpoints[arch])
    base = random_prompts(3, [29])[0]
    [first] = llm.generate(as_inputs([base]), GREEDY)
    assert first.num_cached_tokens == 0
    assert first.token_ids == reference.greedy(arch, base, NUM_NEW)
    # The first request's KV covers its prompt and all but its last output token.
    computed = base + first.token_ids[:-1]
    extra = random_prompts(4, [5, 12, 3])
    later = [
        base[:24] + extra[0],           # three full blocks shared, then diverges
        base[:20] + extra[1],           # diverges inside the third block: two blocks
        base + first.token_ids[:20],    # continues the first request's own output
        list(base),                     # the same prompt again
        extra[2] + base,                # the same tokens, shifted: no hit
        base[BLOCK:],                   # its first block is the first request's second: no hit
    ]
    outputs = llm.generate(as_inputs(later), GREEDY)
    hits = [o.num_cached_tokens for o in outputs]
    assert hits == [expected_hit_tokens(computed, p) for p in later] == [24, 16, 48, 24, 0, 0]
    for prompt, out in zip(later, outputs):
        assert out.token_ids == reference.greedy(arch, prompt, NUM_NEW), len(prompt)
    assert outputs[3].token_ids == first.token_ids
    assert_idle(llm)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_chunked_prefill(arch: str, checkpoints, reference: Reference,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 8
    llm = make_llm(checkpoints[arch], max_num_batched_tokens=budget)
    prompts = random_prompts(5, [30, 17, 9, 1])
    # A prompt sharing the first one's prefix arrives while the first is still running.
    prompts.append(prompts[0][:24] + random_prompts(6, [10])[0])
    stats = record_stats(llm, monkeypatch)
    outputs = llm.generate(as_inputs(prompts), GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference.greedy(arch, prompt, NUM_NEW), len(prompt)
    assert max(s.num_scheduled_tokens for s in stats) == budget
    # Every prompt token and every output token but the last is computed once.
    assert sum(s.num_scheduled_tokens for s in stats) == (
        sum(len(p) + NUM_NEW - 1 for p in prompts) - sum(o.num_cached_tokens for o in outputs))
    assert outputs[-1].num_cached_tokens > 0
    assert_idle(llm)


PREEMPTION_CONFIGS = {
    "prefix_cache": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked": {"max_num_batched_tokens": 8},
}


@pytest.mark.parametrize("config", PREEMPTION_CONFIGS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_preemption(arch: str, config: str, checkpoints, reference: Reference,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    max_len = 64
    # Just enough blocks for one sequence of max_model_len: four cannot all grow.
    llm = make_llm(checkpoints[arch], max_model_len=max_len, num_kv_blocks=max_len // BLOCK,
                   **PREEMPTION_CONFIGS[config])
    prompts = random_prompts(7, [12, 7, 20, 15, 3])
    stats = record_stats(llm, monkeypatch)
    outputs = llm.generate(as_inputs(prompts),
                           SamplingParams(temperature=0, max_tokens=max_len, ignore_eos=True))
    assert sum(s.num_preempted for s in stats) > 0
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length"
        assert len(prompt) + len(out.token_ids) == max_len
        assert out.token_ids == reference.greedy(arch, prompt, max_len - len(prompt)), len(prompt)
    assert_idle(llm)


# --- dtypes and dummy weights ---------------------------------------------------------------


# Max logit error over the logit scale against the float32 model is ~1.5e-2 (bfloat16) and
# ~2e-3 (float16) on these checkpoints.
HALF_TOLERANCE = {"bfloat16": 5e-2, "float16": 1e-2}


@pytest.mark.parametrize("dtype_name", HALF_TOLERANCE)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_half_precision(arch: str, dtype_name: str, checkpoints,
                        reference: Reference) -> None:
    dtype = getattr(torch, dtype_name)
    llm = make_llm(checkpoints[arch], dtype=dtype_name)
    runner = worker_of(llm).runner
    assert runner.dtype == dtype and runner.kv_memory.kv_cache.dtype == dtype
    assert all(p.dtype == dtype for p in runner.model.parameters())
    prompts = random_prompts(1, LENGTHS)
    outputs = llm.generate(as_inputs(prompts), GREEDY)
    for out in outputs:
        assert len(out.token_ids) == NUM_NEW
        assert all(0 <= t < VOCAB for t in out.token_ids)
    token_ids = prompts[-1] + outputs[-1].token_ids
    [logits] = engine_logits(llm, [(token_ids, chunk_lengths(len(token_ids), "unaligned"))])
    assert torch.isfinite(logits).all()
    # Loosely the float32 model: half precision rounding, not a different network.
    assert_close_logits(logits, reference.logits(arch, token_ids),
                        rtol=HALF_TOLERANCE[dtype_name])
    assert_idle(llm)


def copy_checkpoint(src: Path, dst: Path, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dst


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_dummy_weights(arch: str, checkpoints, tmp_path: Path) -> None:
    # No weight files at all: the dummy format must not read any.
    folder = copy_checkpoint(checkpoints[arch], tmp_path / arch, weights=False)
    cfg = json.loads((folder / "config.json").read_text())
    llm = make_llm(folder, load_format="dummy", max_model_len=64)
    model = worker_of(llm).runner.model
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    assert model.model.embed_tokens.weight.shape == (cfg["vocab_size"], hidden)
    assert len(model.model.layers) == cfg["num_hidden_layers"]
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.qkv_proj.weight.shape == ((heads + 2 * kv_heads) * head_dim, hidden)
        assert attn.o_proj.weight.shape == (hidden, heads * head_dim)
        assert layer.mlp.gate_up_proj.weight.shape == (2 * inter, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, inter)
        assert (attn.qkv_proj.bias is not None) == (arch == "qwen2")
        assert hasattr(attn, "q_norm") == (arch == "qwen3")
    assert hasattr(model, "lm_head") == (not cfg["tie_word_embeddings"])
    if not cfg["tie_word_embeddings"]:
        assert model.lm_head.weight.shape == (cfg["vocab_size"], hidden)
    runner = worker_of(llm).runner
    assert runner.kv_memory.kv_cache.shape == (cfg["num_hidden_layers"], 2, runner.kv_memory.num_blocks, BLOCK,
                                     kv_heads, head_dim)
    # Names the safetensors loader would ask for are the checkpoint's own.
    ckpt = load_file(checkpoints[arch] / "model.safetensors")
    assert set(model.checkpoint_names()) == set(ckpt) - (
        {"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    [out] = llm.generate(as_inputs(random_prompts(1, [9])),
                         SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8
    assert_idle(llm)


# --- checkpoint loading errors --------------------------------------------------------------


@pytest.fixture
def qwen3_copy(checkpoints, tmp_path: Path) -> Path:
    return copy_checkpoint(checkpoints["qwen3"], tmp_path / "ckpt")


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not found"):
        local_llm(tmp_path / "nowhere")


def test_folder_without_config(qwen3_copy: Path) -> None:
    (qwen3_copy / "config.json").unlink()
    with pytest.raises(ValueError, match=r"no config\.json"):
        local_llm(qwen3_copy)


def test_folder_without_weights(checkpoints, tmp_path: Path) -> None:
    folder = copy_checkpoint(checkpoints["qwen3"], tmp_path / "ckpt", weights=False)
    with pytest.raises(ValueError, match=r"no \.safetensors files"):
        local_llm(folder, max_model_len=64)


def test_unsupported_architecture(qwen3_copy: Path) -> None:
    path = qwen3_copy / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, "
                                         r".*Qwen2ForCausalLM, .*Qwen3ForCausalLM"):
        local_llm(qwen3_copy, max_model_len=64)


def test_max_model_len_over_model_limit(checkpoints) -> None:
    with pytest.raises(ValueError, match=r"max_model_len=1024.*max_position_embeddings=512"):
        local_llm(checkpoints["qwen3"], max_model_len=1024)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight",
                                  "model.layers.0.self_attn.k_proj.weight",   # a fused shard
                                  "model.layers.1.self_attn.q_norm.weight",
                                  "lm_head.weight"])
def test_missing_tensor(qwen3_copy: Path, name: str) -> None:
    rewrite_weights(qwen3_copy, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing 1 tensors: {name}"):
        local_llm(qwen3_copy, max_model_len=64)


@pytest.mark.parametrize("name,rows,cols", [
    ("model.embed_tokens.weight", 0, 1),
    ("model.layers.0.mlp.up_proj.weight", 1, 0),
    ("model.layers.0.self_attn.v_proj.weight", 1, 0),     # too long for its fused shard
    ("model.layers.1.self_attn.k_proj.weight", -1, 0),    # too short: must not half-fill it
    ("model.layers.0.mlp.gate_proj.weight", -1, 0),
    ("model.norm.weight", 1, None),
])
def test_misshaped_tensor(qwen3_copy: Path, name: str, rows: int, cols: int | None) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[name]
        shape = (t.shape[0] + rows,) + (() if cols is None else (t.shape[1] + cols,))
        tensors[name] = torch.zeros(shape, dtype=t.dtype)

    rewrite_weights(qwen3_copy, edit)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape .*expected"):
        local_llm(qwen3_copy, max_model_len=64)


def test_unexpected_tensor(qwen3_copy: Path) -> None:
    rewrite_weights(qwen3_copy, lambda t: t.update({"model.layers.9.mlp.up_proj.weight":
                                                      torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.9\.mlp\.up_proj"):
        local_llm(qwen3_copy, max_model_len=64)


def shard_checkpoint(folder: Path) -> list[str]:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[::2], names[1::2]]
    weight_map = {}
    for file, half in zip(files, halves):
        save_file({n: tensors[n] for n in half}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sharded_checkpoint(arch: str, checkpoints, tmp_path: Path,
                            reference: Reference) -> None:
    folder = copy_checkpoint(checkpoints[arch], tmp_path / arch)
    shard_checkpoint(folder)
    llm = make_llm(folder)
    prompts = random_prompts(1, LENGTHS)
    outputs = llm.generate(as_inputs(prompts), GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference.greedy(arch, prompt, NUM_NEW)
    unsharded = worker_of(make_llm(checkpoints[arch])).runner.model.state_dict()
    for name, value in worker_of(llm).runner.model.state_dict().items():
        assert torch.equal(value, unsharded[name]), name
    assert_idle(llm)


def test_sharded_checkpoint_missing_shard(qwen3_copy: Path) -> None:
    files = shard_checkpoint(qwen3_copy)
    (qwen3_copy / files[1]).unlink()
    with pytest.raises(ValueError, match=rf"{files[1]} listed in the index is missing"):
        local_llm(qwen3_copy, max_model_len=64)


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_llm(checkpoints) -> LLM:
    return make_llm(checkpoints["qwen2"], max_model_len=64)


@pytest.mark.parametrize("prompts,match", [
    ("", "prompt is empty"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt_token_ids": []}, "prompt is empty"),
    (["Hello", ""], "prompt is empty"),
    ({"prompt_token_ids": list(range(3, 67))}, "64 tokens; max_model_len=64"),
    ({"prompt_token_ids": [5, VOCAB, 7]}, rf"token id {VOCAB} is outside the vocabulary"),
    ({"prompt_token_ids": [5, -1]}, r"token id -1 is outside the vocabulary"),
    ({"prompt_token_ids": [5, 1.5]}, "list of integers"),
    ({"tokens": [5]}, "a prompt is a string"),
])
def test_bad_prompt(small_llm: LLM, prompts: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_llm.generate(prompts, GREEDY)
    # Nothing of the failed batch was queued, and the engine still works.
    assert_idle(small_llm)
    [out] = small_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4,
                                                       ignore_eos=True))
    assert len(out.token_ids) == 4
    assert_idle(small_llm)


def test_bad_params_list(small_llm: LLM) -> None:
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        small_llm.generate(["Hello", "world"], [GREEDY])
    with pytest.raises(ValueError, match="got 3 SamplingParams for 2 prompts"):
        small_llm.generate(["Hello", "world"], [GREEDY] * 3)
    with pytest.raises(ValueError, match="params must be SamplingParams"):
        small_llm.generate(["Hello"], [{"temperature": 0}])
    assert_idle(small_llm)


def test_bad_chat(small_llm: LLM) -> None:
    assert small_llm.chat([]) == []   # no conversations, like generate([])
    with pytest.raises(ValueError, match="non-empty list of messages"):
        small_llm.chat([[]])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        small_llm.chat([{"role": "user"}])
    assert_idle(small_llm)


def test_longest_prompt(small_llm: LLM) -> None:
    """A prompt one token short of max_model_len gets exactly one token."""
    [out] = small_llm.generate({"prompt_token_ids": random_prompts(8, [63])[0]}, GREEDY)
    assert len(out.token_ids) == 1
    assert out.finish_reason == "length"
    assert_idle(small_llm)
