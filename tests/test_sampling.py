"""Sampling through the public LLM API on the tiny llama checkpoint, and the Sampler on its own."""

from __future__ import annotations

import msgspec
import pytest
import torch

from tests.helpers import local_llm, wait_idle
from streamvlm.engine.llm import LLM
from streamvlm.contract.sampling import SamplingParams
from tests.conftest import hf_model
from workers.sampler import Sampler
from workers.sequence import Sequence

EOS = 2
PROMPTS = ["Hello world", "The quick brown fox", "What is the capital of France?",
           "The engine", "She said", "world"]
# Candidates for a prompt whose greedy output reaches EOS within a few tokens.
EOS_CANDIDATES = ["a", "b", "c", "x", "Hi", "ok", "the", "fox", "Paris"]


@pytest.fixture(scope="module")
def llm(llama_path):
    engine = local_llm(llama_path, max_model_len=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf(llama_path):
    return hf_model(llama_path)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def gen(llm: LLM, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def assert_no_blocks_held(llm: LLM) -> None:
    assert all(r == 0 for r in wait_idle(llm).pool.ref_counts)


def num_repeats(outputs) -> int:
    """Positions whose token equals the previous one, over all outputs."""
    return sum(sum(a == b for a, b in zip(o.token_ids, o.token_ids[1:])) for o in outputs)


def num_distinct(outputs) -> int:
    return sum(len(set(o.token_ids)) for o in outputs)


# --- greedy equivalents -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def baseline(llm):
    """Greedy outputs of PROMPTS, ignoring EOS."""
    outputs = gen(llm, PROMPTS, greedy(max_tokens=24, ignore_eos=True))
    assert num_repeats(outputs) > len(PROMPTS) * 10   # the premise: the tiny model repeats a lot
    return outputs


def run_variants(llm, variants: list[dict], **common) -> list[list]:
    """All PROMPTS under each variant of SamplingParams, in one batch: one list per variant."""
    params = [SamplingParams(**{**common, **kw}) for kw in variants for _ in PROMPTS]
    outputs = gen(llm, PROMPTS * len(variants), params)
    return [outputs[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i in range(len(variants))]


def test_temperature_zero_is_argmax_of_hf_logits(hf, baseline):
    for out in baseline[:2]:
        ids = out.prompt_token_ids + out.token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        n = len(out.prompt_token_ids)
        assert out.token_ids == logits[n - 1:-1].argmax(-1).tolist()


def test_filters_that_keep_one_token_equal_greedy(llm, baseline):
    variants = [dict(top_k=1), dict(top_k=1, seed=5), dict(top_p=1e-6), dict(min_p=1.0),
                dict(temperature=1e-4), dict(temperature=0, top_k=3, top_p=0.5, seed=1)]
    results = run_variants(llm, variants, temperature=1.0, max_tokens=24, ignore_eos=True)
    for kw, outputs in zip(variants, results):
        assert [o.token_ids for o in outputs] == [o.token_ids for o in baseline], kw


# --- seeds --------------------------------------------------------------------------------------

def test_seed_reproduces_alone_and_in_a_mixed_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = gen(llm, ["Hello world"], seeded)[0].token_ids
    assert len(alone) == 16

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4   # > 2 KV blocks
    batch = [
        (long_prompt, SamplingParams(temperature=1.0, max_tokens=5)),
        ("Hello world", seeded),
        ("a", SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True)),
        ("What is the capital of France?", SamplingParams(temperature=1.0, max_tokens=3)),
        ("Hello world", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=18)),
        (long_prompt, greedy(max_tokens=9)),
        ("Hello world", seeded),
    ]
    outputs = gen(llm, [p for p, _ in batch], [s for _, s in batch])
    assert outputs[1].token_ids == alone
    assert outputs[6].token_ids == alone
    # The other seeded request is reproducible as well, whatever runs beside it.
    again = gen(llm, ["a", "The engine"],
                [batch[2][1], SamplingParams(temperature=1.0, max_tokens=7)])
    assert again[0].token_ids == outputs[2].token_ids
    assert_no_blocks_held(llm)


def test_different_seeds_differ(llm):
    outputs = gen(llm, ["Hello world"] * 3,
                  [SamplingParams(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True)
                   for s in (1, 2, 3)])
    token_ids = [tuple(o.token_ids) for o in outputs]
    assert len(set(token_ids)) == 3


# --- penalties in greedy mode -------------------------------------------------------------------

PENALTIES = [dict(repetition_penalty=1.3), dict(repetition_penalty=2.0),
             dict(frequency_penalty=0.5), dict(frequency_penalty=1.5),
             dict(presence_penalty=0.5), dict(presence_penalty=1.5),
             dict(frequency_penalty=-0.5)]


@pytest.fixture(scope="module")
def penalized(llm) -> dict[str, list]:
    results = run_variants(llm, PENALTIES, temperature=0, max_tokens=24, ignore_eos=True)
    return {str(kw): outputs for kw, outputs in zip(PENALTIES, results)}


@pytest.mark.parametrize("kw", [kw for kw in PENALTIES if min(kw.values()) > 0], ids=str)
def test_penalties_reduce_repetition(baseline, penalized, kw):
    outputs = penalized[str(kw)]
    assert num_repeats(outputs) < num_repeats(baseline)
    assert num_distinct(outputs) > num_distinct(baseline)


def test_strong_penalties_never_repeat(penalized):
    # With a penalty larger than the logits' spread, no token is picked twice.
    for kw in (dict(repetition_penalty=2.0), dict(frequency_penalty=1.5),
               dict(presence_penalty=1.5)):
        for out in penalized[str(kw)]:
            assert len(set(out.token_ids)) == len(out.token_ids), kw


def test_negative_frequency_penalty_increases_repetition(baseline, penalized):
    outputs = penalized[str(dict(frequency_penalty=-0.5))]
    assert num_repeats(outputs) > num_repeats(baseline)
    assert num_distinct(outputs) < num_distinct(baseline)


# --- stopping -----------------------------------------------------------------------------------

def test_max_tokens_ends_with_length(llm):
    out = gen(llm, ["Hello world"], greedy(max_tokens=7))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def eos_prompt(llm):
    """A prompt whose greedy output reaches EOS within 8 tokens, and that output."""
    outputs = gen(llm, EOS_CANDIDATES, greedy(max_tokens=8))
    for prompt, out in zip(EOS_CANDIDATES, outputs):
        if out.finish_reason == "stop" and len(out.token_ids) >= 2:
            return prompt, out.token_ids
    pytest.fail("no candidate prompt reaches EOS early under greedy decoding")


def test_eos_ends_with_stop(llm, eos_prompt):
    prompt, ids = eos_prompt
    out = gen(llm, [prompt], greedy(max_tokens=20))[0]
    assert out.token_ids == ids and ids[-1] == EOS and EOS not in ids[:-1]
    assert out.finish_reason == "stop"
    # EOS stays in token_ids but is a special token: not in the text.
    assert out.text == llm.tokenizer.decode(ids[:-1])


def test_ignore_eos_continues_past_eos(llm, eos_prompt):
    prompt, ids = eos_prompt
    out = gen(llm, [prompt], greedy(max_tokens=len(ids) + 6, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == len(ids) + 6
    assert out.token_ids[:len(ids)] == ids   # EOS sampled, and generation went on


def test_stop_token_ids_end_the_output(llm, baseline):
    ref = baseline[0].token_ids
    stop_id = ref[3]
    first = ref.index(stop_id)
    outputs = gen(llm, [PROMPTS[0]] * 2,
                  [greedy(max_tokens=12, stop_token_ids=[stop_id]),
                   # A stop token id ends the output even when ignore_eos is set.
                   greedy(max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True)])
    for out in outputs:
        assert out.token_ids == ref[:first + 1]   # the stop token is kept
        assert out.finish_reason == "stop"


def test_min_tokens_holds_back_eos(llm, eos_prompt):
    prompt, ids = eos_prompt
    min_tokens = len(ids) + 3
    out = gen(llm, [prompt], greedy(max_tokens=min_tokens + 8, min_tokens=min_tokens))[0]
    assert len(out.token_ids) >= min_tokens
    assert EOS not in out.token_ids[:min_tokens]
    assert out.token_ids[:len(ids) - 1] == ids[:-1]   # same greedy path until EOS was due
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == EOS
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == min_tokens + 8


def test_min_tokens_holds_back_stop_token_ids(llm, baseline):
    stop_id = baseline[0].token_ids[0]   # greedy picks it first
    without, out = gen(llm, [PROMPTS[0]] * 2,
                       [greedy(max_tokens=12, stop_token_ids=[stop_id]),
                        greedy(max_tokens=12, stop_token_ids=[stop_id], min_tokens=4)])
    assert without.token_ids == [stop_id] and without.finish_reason == "stop"
    assert len(out.token_ids) >= 4
    assert stop_id not in out.token_ids[:4]
    assert out.finish_reason == ("stop" if stop_id in out.token_ids else "length")


def _stop_cases(llm, baseline) -> list[tuple[str, str, str, list[int]]]:
    """(prompt, stop string, expected text, expected token ids) found in greedy outputs:
    one stop string equal to a whole token's text, one that spans two tokens."""
    tok = llm.tokenizer
    whole, spanning = None, None
    for prompt, out in zip(PROMPTS, baseline):
        ids, full = out.token_ids, out.text
        for k in range(1, len(ids)):
            before, upto = tok.decode(ids[:k]), tok.decode(ids[:k + 1])
            if "\ufffd" in upto or not upto.startswith(before) or len(upto) - len(before) < 1:
                break
            token_text = upto[len(before):]
            if (whole is None and before and token_text.isprintable()
                    and full.find(token_text) == len(before)):
                whole = (prompt, token_text, before, ids[:k + 1])
            # Two characters: the last of a multi-character token, then a one-character token.
            stop = upto[-2:]
            if (spanning is None and len(token_text) == 1 and k >= 2
                    and len(tok.decode(ids[:k - 1])) < len(before) - 1
                    and stop.isprintable() and full.find(stop) == len(upto) - 2):
                spanning = (prompt, stop, upto[:-2], ids[:k + 1])
        if whole and spanning:
            return [whole, spanning]
    pytest.fail(f"no stop-string case found: {whole=} {spanning=}")


def test_stop_strings_end_the_output_and_are_not_in_text(llm, baseline):
    cases = _stop_cases(llm, baseline)
    params = [greedy(max_tokens=24, ignore_eos=True, stop=stops, logprobs=True)
              for _, stop, _, _ in cases for stops in ([stop], ["\u2603never", stop])]
    outputs = gen(llm, [prompt for prompt, *_ in cases for _ in range(2)], params)
    for i, (_, stop, text, ids) in enumerate(cases):
        for out in outputs[2 * i:2 * i + 2]:
            assert out.finish_reason == "stop", stop
            assert out.text == text and stop not in out.text
            assert out.token_ids == ids   # up to the token that completed the stop string
            assert len(out.logprobs) == len(out.token_ids)
    # The worker's copy of a request ended by a stop string is aborted: no blocks leak.
    assert_no_blocks_held(llm)


# --- logprobs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.5)])
def test_logprobs_match_hf_log_softmax(llm, hf, kw):
    prompts = ["Hello world", "What is the capital of France?"]
    outputs = gen(llm, prompts, greedy(max_tokens=10, ignore_eos=True, logprobs=True,
                                       top_logprobs=5, **kw))
    for out in outputs:
        ids = out.prompt_token_ids + out.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
        n = len(out.prompt_token_ids)
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 10
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[n - 1 + i]
            # Logprobs are of the raw model logits, before any penalty.
            assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert len(entry.top_token_ids) == len(entry.top_logprobs) == 5
            assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
            assert entry.top_logprobs == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)
            assert entry.top_token_ids == row.topk(5).indices.tolist()
            if not kw:
                assert entry.top_token_ids[0] == token
                assert entry.top_logprobs[0] == entry.logprob


def test_logprobs_absent_unless_asked(llm):
    out = gen(llm, ["Hello world"], greedy(max_tokens=3))[0]
    assert out.logprobs is None
    out = gen(llm, ["Hello world"], SamplingParams(max_tokens=4, seed=3, logprobs=True))[0]
    assert len(out.logprobs) == 4 and all(e.top_token_ids == [] for e in out.logprobs)
    assert all(e.logprob <= 0 for e in out.logprobs)
    # top_logprobs alone turns logprobs on.
    assert SamplingParams(top_logprobs=2).logprobs


# --- SamplingParams validation ------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=1.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_logprobs=21), "top_logprobs"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(seed=1.5), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    # Past what the wire to the workers carries (64 bits; token ids 32).
    (dict(seed=2**64), "seed"),
    (dict(seed=-2**63 - 1), "seed"),
    (dict(top_k=2**70), "top_k"),
    (dict(top_k=-2**70), "top_k"),
    (dict(stop_token_ids=[2**70]), "stop_token_ids"),
    (dict(stop_token_ids=[2**31]), "stop_token_ids"),
    (dict(max_tokens=2**63), "max_tokens"),
    (dict(max_tokens=2**70, min_tokens=2**70), "max_tokens"),
    (dict(top_logprobs=2**70), "top_logprobs"),
    (dict(max_tokens=True), "max_tokens"),
])
def test_sampling_params_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_sampling_params_accepts_edges():
    SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=0, max_tokens=1, top_logprobs=20,
                   min_tokens=1)
    assert SamplingParams(stop="x").stop == ["x"]
    largest = SamplingParams(seed=2**64 - 1, top_k=2**63 - 1, max_tokens=2**63 - 1,
                             min_tokens=2**63 - 1, stop_token_ids=[2**31 - 1])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(largest), type=SamplingParams) == largest
    smallest = SamplingParams(seed=-2**63, top_k=-2**63)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(smallest), type=SamplingParams) == smallest


# --- the Sampler on hand-made logits ------------------------------------------------------------

@pytest.fixture
def sampler():
    return Sampler(torch.device("cpu"), seed=0)


def make_seq(prompt: list[int], output: list[int] = (), eos: list[int] = (EOS,),
             **params) -> Sequence:
    seq = Sequence("r", list(prompt), SamplingParams(**params), list(eos), 0)
    for t in output:
        seq.append_token(t, None)
    return seq


LOGITS = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]


def test_repetition_penalty_math(sampler):
    # HF style, over prompt and output: positive logits divided, negative ones multiplied.
    seq = make_seq([0, 1], [1, 3, 3], repetition_penalty=2.0)
    out = sampler._apply_penalties(torch.tensor([LOGITS]), [seq])
    assert out[0].tolist() == [1.0, -2.0, 0.5, -6.0, 1.0, 0.0]


def test_frequency_and_presence_penalty_math(sampler):
    # OpenAI style, over output tokens only: logit -= freq * count + presence * (count > 0).
    seq = make_seq([0, 1], [1, 3, 3], frequency_penalty=0.5, presence_penalty=0.25)
    out = sampler._apply_penalties(torch.tensor([LOGITS]), [seq])
    assert out[0].tolist() == [2.0, -1.75, 0.5, -4.25, 1.0, 0.0]
    # Negative values reward repetition.
    seq = make_seq([0, 1], [1, 3, 3], frequency_penalty=-0.5, presence_penalty=-1.0)
    out = sampler._apply_penalties(torch.tensor([LOGITS]), [seq])
    assert out[0].tolist() == [2.0, 0.5, 0.5, -1.0, 1.0, 0.0]
    # No output yet: nothing to penalize.
    seq = make_seq([0, 1, 3], frequency_penalty=1.0, presence_penalty=1.0)
    assert sampler._apply_penalties(torch.tensor([LOGITS]), [seq])[0].tolist() == LOGITS


def test_penalties_combined_and_per_row(sampler):
    both = make_seq([0, 1], [1, 3, 3], repetition_penalty=2.0, frequency_penalty=0.5,
                    presence_penalty=0.25)
    plain = make_seq([0, 1], [1, 3, 3])
    out = sampler._apply_penalties(torch.tensor([LOGITS, LOGITS]), [both, plain])
    assert out[0].tolist() == [1.0, -2.75, 0.5, -7.25, 1.0, 0.0]
    assert out[1].tolist() == LOGITS


def test_greedy_picks_argmax_after_penalties_and_logprobs_stay_raw(sampler):
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.5, 0.0]])
    seq = make_seq([5], [0], temperature=0, repetition_penalty=2.0, logprobs=True,
                   top_logprobs=2)
    out = sampler(logits.clone(), [seq])
    assert out.token_ids == [4]   # token 0's 2.0 became 1.0 < 1.5
    raw = torch.log_softmax(logits, dim=-1)[0]
    entry = out.logprobs[0]
    assert entry.logprob == pytest.approx(raw[4].item())
    assert entry.top_token_ids == [0, 4]
    assert entry.top_logprobs == pytest.approx([raw[0].item(), raw[4].item()])


def test_stop_tokens_banned_before_min_tokens(sampler):
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0, 4.0, 3.0]])   # EOS (2) best, then 4, then 5
    # One output token so far, min_tokens 3: EOS and stop token 4 are banned.
    seq = make_seq([0], [1], temperature=0, min_tokens=3, stop_token_ids=[4])
    assert sampler(logits.clone(), [seq]).token_ids == [5]
    # ignore_eos: EOS does not stop, so it is not banned either; stop_token_ids still are.
    seq = make_seq([0], [1], temperature=0, min_tokens=3, stop_token_ids=[4], ignore_eos=True)
    assert sampler(logits.clone(), [seq]).token_ids == [2]
    # Once min_tokens outputs exist, nothing is banned.
    seq = make_seq([0], [1, 1, 1], temperature=0, min_tokens=3, stop_token_ids=[4])
    assert sampler(logits.clone(), [seq]).token_ids == [2]
    # Sampled rows are banned too.
    seqs = [make_seq([0], [1], temperature=1.0, seed=s, min_tokens=2, stop_token_ids=[4])
            for s in range(200)]
    drawn = sampler(logits.repeat(200, 1), seqs).token_ids
    assert 2 not in drawn and 4 not in drawn


PROBS = [0.4, 0.3, 0.2, 0.1]


def draw_many(sampler: Sampler, probs: list[float], n: int = 400, **params) -> list[int]:
    logits = torch.tensor([probs]).log().repeat(n, 1)
    seqs = [make_seq([0], seed=s, **params) for s in range(n)]
    return sampler(logits, seqs).token_ids


@pytest.mark.parametrize("kw, allowed", [
    (dict(), {0, 1, 2, 3}),
    (dict(top_k=1), {0}),
    (dict(top_k=2), {0, 1}),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_k=10), {0, 1, 2, 3}),
    (dict(top_p=0.35), {0}),
    (dict(top_p=0.65), {0, 1}),
    (dict(top_p=0.75), {0, 1, 2}),
    (dict(min_p=0.8), {0}),          # threshold 0.32
    (dict(min_p=0.6), {0, 1}),       # threshold 0.24
    (dict(min_p=0.45), {0, 1, 2}),   # threshold 0.18
    (dict(top_k=3, top_p=0.65), {0, 1}),
    # top_p applies to the distribution that top_k left, renormalized: [4/7, 3/7].
    (dict(top_k=2, top_p=0.5), {0}),
    (dict(top_p=0.95, min_p=0.6), {0, 1}),
])
def test_filters_mask_exactly_the_expected_tokens(sampler, kw, allowed):
    drawn = draw_many(sampler, PROBS, **kw)
    assert set(drawn) == allowed


def test_temperature_shapes_the_distribution(sampler):
    logits = [1.0, 0.0, -1.0, -2.0]
    n = 4000
    for temperature in (0.5, 1.0, 2.0):
        drawn = draw_many(sampler, torch.tensor(logits).exp().tolist(), n=n,
                          temperature=temperature)
        expected = torch.softmax(torch.tensor(logits) / temperature, dim=-1).tolist()
        counts = [drawn.count(t) / n for t in range(4)]
        for got, want in zip(counts, expected):
            assert abs(got - want) < 0.03, (temperature, counts, expected)
    # A tiny temperature is (almost surely) the argmax; a huge one is near uniform.
    assert set(draw_many(sampler, PROBS, temperature=1e-3)) == {0}
    flat = draw_many(sampler, PROBS, n=n, temperature=100.0)
    assert all(abs(flat.count(t) / n - 0.25) < 0.03 for t in range(4))


def test_seeded_draw_depends_on_seed_and_position_only(sampler):
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    a = make_seq([1, 2, 3], [5, 6], seed=42)
    b = make_seq([9], [7, 7], seed=42)   # other tokens, same output position
    others = [make_seq([0], [1], seed=s) for s in range(5)] + [make_seq([0]), make_seq([0])]
    alone = sampler(logits.clone(), [a]).token_ids[0]
    batch = sampler(logits.repeat(8, 1), others[:3] + [b] + others[3:]).token_ids
    assert batch[3] == alone
    # A later position draws other noise: over many positions the draws are not all equal.
    draws = {sampler(logits.clone(), [make_seq([0], [1] * k, seed=42)]).token_ids[0]
             for k in range(20)}
    assert len(draws) > 1



def test_sampler_logprobs_per_row_come_with_the_tokens():
    """Rows asking for different numbers of alternatives (or none) in one batch: each gets its own,
    computed on the device at launch and read on the host with the tokens."""
    import torch

    from workers.sampler import Sampler
    from workers.sequence import Sequence

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    kinds = [SamplingParams(temperature=0, top_logprobs=3), SamplingParams(temperature=0, logprobs=True),
             SamplingParams(temperature=0)]
    seqs = [Sequence(f"s{i}", [1, 2], p, [2], i) for i, p in enumerate(kinds)]
    out = Sampler(torch.device("cpu"), 0)(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.token_ids == logits.argmax(-1).tolist()
    first, second, third = out.logprobs
    assert first.logprob == pytest.approx(raw[0, out.token_ids[0]].item())
    assert first.top_token_ids == raw[0].topk(3).indices.tolist()
    assert first.top_logprobs == pytest.approx(raw[0].topk(3).values.tolist())
    assert second.logprob == pytest.approx(raw[1, out.token_ids[1]].item()) and second.top_token_ids == []
    assert third is None
