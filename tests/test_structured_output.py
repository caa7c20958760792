"""Structured output (constrained decoding with llguidance) on a tiny random Llama: a random model
writes valid output only because the grammar's mask leaves it nothing else."""

from __future__ import annotations

import json
import re

import pytest
import torch

from streamvlm.contract.sampling import SamplingParams, StructuredOutputs
from streamvlm.engine.structured_output import compile_structured_outputs
from tests.conftest import VOCAB
from tests.helpers import local_llm, wait_idle, worker_of

jsonschema = pytest.importorskip("jsonschema")

# Bounded strings and numbers: a random model samples uniformly among what the grammar allows, so
# an unbounded string would rarely close within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
PROMPT = "Describe a person as JSON."


@pytest.fixture(scope="module")
def llm(llama_path):
    engine = local_llm(llama_path, max_model_len=512)
    yield engine
    engine.shutdown()


def _one(llm, params: SamplingParams, prompt: str = PROMPT):
    return llm.generate([prompt], params, use_tqdm=False)[0]


def test_json_schema_output_parses_and_validates_over_seeds(llm):
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                             structured_outputs=StructuredOutputs(json=PERSON)) for seed in range(10)]
    outputs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({out.text for out in outputs}) > 1   # the seeds still matter


def test_json_schema_as_text_and_greedy(llm):
    out = _one(llm, SamplingParams(temperature=0, max_tokens=200,
                                   structured_outputs=StructuredOutputs(json=json.dumps(PERSON))))
    jsonschema.validate(json.loads(out.text), PERSON)


def test_json_object(llm):
    for seed in range(4):
        out = _one(llm, SamplingParams(seed=seed, max_tokens=200,
                                       structured_outputs=StructuredOutputs(json_object=True)))
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:   # an unbounded object may outlast max_tokens: what there is starts one
            assert out.text.startswith("{")


def test_regex_and_choice(llm):
    for seed in range(5):
        out = _one(llm, SamplingParams(seed=seed, max_tokens=30,
                                       structured_outputs=StructuredOutputs(regex=r"[0-9]{3}-[a-c]{2,4}")))
        assert re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", out.text), out.text
        assert out.finish_reason == "stop"
        choices = ["red", "green", "blue sky"]
        out = _one(llm, SamplingParams(seed=seed, max_tokens=30,
                                       structured_outputs=StructuredOutputs(choice=choices)))
        assert out.text in choices and out.finish_reason == "stop"


def test_lark_grammar(llm):
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[0-9]/'
    out = _one(llm, SamplingParams(seed=3, max_tokens=40, structured_outputs={"grammar": grammar}))
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", out.text), out.text


def test_invalid_grammars_are_refused_naming_the_problem(llm):
    bad = [({"json": {"type": "no-such-type"}}, "no-such-type"),
           ({"json": "{not json"}, "json"),
           ({"regex": "(ab"}, "unclosed group"),
           ({"grammar": "start: undefined_rule"}, "undefined_rule")]
    for spec, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            _one(llm, SamplingParams(max_tokens=5, structured_outputs=spec))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    wait_idle(llm)


def test_grammar_cache_is_by_schema_text():
    a = compile_structured_outputs(StructuredOutputs(json={"type": "object", "required": ["x"]}))
    b = compile_structured_outputs(StructuredOutputs(json={"required": ["x"], "type": "object"}))
    assert a is b


def test_mixed_batch_keeps_free_requests_exact(llm):
    """Requests without a grammar get the same tokens whether or not grammar rows share their steps."""
    free = [SamplingParams(temperature=t, seed=s, max_tokens=24, ignore_eos=True)
            for t, s in [(0, None), (1.0, 7), (0.8, 11)]]
    prompts = ["Hello there", "The quick brown fox", "One two three"]
    alone = llm.generate(prompts, free, use_tqdm=False)
    constrained = [SamplingParams(seed=s, max_tokens=60, structured_outputs=StructuredOutputs(json=PERSON))
                   for s in range(3)]
    mixed = llm.generate(prompts + [PROMPT] * 3, free + constrained, use_tqdm=False)
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    wait_idle(llm)


def test_async_scheduling_and_preemption(llama_path):
    """Grammar steps wait for their tokens under async scheduling; a preempted request's matcher
    follows its recomputed tokens."""
    engine = local_llm(llama_path, max_model_len=512, async_scheduling=True, num_kv_blocks=40, block_size=16)
    try:
        params = [SamplingParams(seed=seed, max_tokens=200, structured_outputs=StructuredOutputs(json=PERSON))
                  for seed in range(6)]
        free = [SamplingParams(seed=seed, max_tokens=150, ignore_eos=True) for seed in range(6)]
        outputs = engine.generate([PROMPT * 8] * 12, params + free, use_tqdm=False)
        for out in outputs[:6]:
            jsonschema.validate(json.loads(out.text), PERSON)
        assert engine.engine.metrics.num_preemptions > 0
        assert engine.config.scheduler is not None and worker_of(engine).async_scheduling
    finally:
        engine.shutdown()


def test_matcher_follows_the_sequence_tokens(llama_path):
    """The matcher consumes the tokens it has not seen (a first token from a prefill group, a step's),
    skips a placeholder still in flight, and replays from the start when the tokens were replaced."""
    from streamvlm.contract.model_source import ModelSource
    from workers.structured_output import GrammarMatchers, MaskBatch

    matchers = GrammarMatchers(ModelSource("hf", str(llama_path)), None, VOCAB)
    grammar = compile_structured_outputs(StructuredOutputs(choice=["ab", "abab"]))
    tokenizer = matchers.tokenizer()
    prompt = [5, 6, 7]
    a, b = tokenizer.tokenize_str("a"), tokenizer.tokenize_str("b")
    state = matchers.build(grammar)
    eos = frozenset({2})
    tokens = prompt + a + b + [-1]
    assert not state.is_complete(tokens, len(prompt), eos)
    assert state.num_consumed == 2            # the placeholder waits
    tokens[-1:] = a
    assert not state.is_complete(tokens, len(prompt), eos) and state.num_consumed == 3
    shorter = prompt + a
    assert not state.is_complete(shorter, len(prompt), eos) and state.num_consumed == 1
    masks = MaskBatch(torch.device("cpu"))
    allowed = masks.allowed([(state, shorter, len(prompt), eos)], VOCAB)[0].nonzero().flatten().tolist()
    assert b[0] in allowed and a[0] not in allowed and 2 not in allowed
    # Two rows of one batch, each its own grammar's mask; "ab" is complete: the request's EOS may end it.
    done = prompt + a + b
    other = matchers.build(grammar)
    both = masks.allowed([(other, shorter, len(prompt), eos), (state, done, len(prompt), eos)], VOCAB)
    assert both[0].nonzero().flatten().tolist() == allowed
    allowed = both[1].nonzero().flatten().tolist()
    assert 2 in allowed and a[0] in allowed
    assert state.is_complete(done + [2], len(prompt), eos)


def test_same_constrained_tokens_with_tensor_parallelism_and_prefill_decode(loop, llama_path):
    """The mask is applied where sampling happens (rank 0; the prefill group for the first token,
    the decode group after), so a seeded constrained request gives the same tokens every way."""
    import asyncio

    from streamvlm import AsyncEngine, EngineConfig
    from tests.helpers import run

    params = [SamplingParams(seed=seed, max_tokens=120, structured_outputs=StructuredOutputs(json=PERSON))
              for seed in range(3)]
    prompts = [{"prompt_token_ids": list(range(10 + i, 40 + i))} for i in range(3)]
    options = dict(model=str(llama_path), max_model_len=256, block_size=8, max_num_batched_tokens=32,
                   num_kv_blocks=128)

    async def tokens(**overrides):
        async with AsyncEngine(EngineConfig(**options, **overrides)) as engine:
            outputs = await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, params)))
        for out in outputs:
            jsonschema.validate(json.loads(out.text), PERSON)
        return [out.token_ids for out in outputs]

    one = run(loop, tokens(worker_backend="thread"))
    assert run(loop, tokens(tensor_parallel_size=2)) == one
    assert run(loop, tokens(worker_backend="thread", groups=["prefill", "decode"])) == one
