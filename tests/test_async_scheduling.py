"""Async scheduling: step N+1 is scheduled and launched before step N's tokens reach the host, its
placeholder tokens filled on the device. Driven on CPU (where the forward pass is synchronous, so
nothing overlaps, but every step of the bookkeeping runs): the tokens must be those of the
synchronous worker, whatever ends, aborts or preempts the requests."""

from __future__ import annotations

from typing import Any

import pytest

from streamvlm.contract.protocol import AddRequest, StepOutput
from streamvlm.contract.sampling import SamplingParams
from streamvlm.engine.structured_output import compile_structured_outputs
from tests.helpers import local_llm, make_worker
from workers.sequence import PLACEHOLDER_TOKEN

OPTIONS = dict(max_model_len=128, block_size=8, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints["qwen3"]


def add(worker: Any, request_id: str, prompt: list[int], **params: Any) -> None:
    sampling = SamplingParams(**params)
    grammar = compile_structured_outputs(sampling.structured_outputs) if sampling.structured_outputs else ""
    worker.add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt, params=sampling,
                                  eos_token_ids=[2], grammar=grammar))


def drive(worker: Any, requests: dict[str, tuple[list[int], dict]], abort_after: dict[str, int] | None = None,
          ) -> tuple[dict[str, list[int]], dict[str, str], list[StepOutput]]:
    """Run the requests to the end: their tokens and finish reasons, and every step's output.
    abort_after[r] = k aborts r once k of its tokens have streamed."""
    for request_id, (prompt, params) in requests.items():
        add(worker, request_id, prompt, **params)
    tokens = {request_id: [] for request_id in requests}
    finish: dict[str, str] = {}
    outs = []
    for _ in range(500):
        if not worker.has_work():
            break
        out = worker.step()
        outs.append(out)
        for delta in out.request_deltas():
            assert PLACEHOLDER_TOKEN not in delta.new_token_ids
            tokens[delta.request_id] += delta.new_token_ids
            if delta.finish_reason:
                finish[delta.request_id] = delta.finish_reason
        for request_id, count in (abort_after or {}).items():
            if len(tokens[request_id]) >= count and request_id not in finish:
                worker.abort([request_id])
    assert not worker.has_work() and not worker.sequences
    assert not any(worker.pool.ref_counts), "blocks still held"
    return tokens, finish, outs


def both(path, requests, abort_after=None, **options):
    sync = make_worker(path, **{**OPTIONS, **options}, async_scheduling=False)
    ahead = make_worker(path, **{**OPTIONS, **options}, async_scheduling=True)
    assert ahead.async_scheduling and not sync.async_scheduling
    return drive(sync, requests, abort_after), drive(ahead, requests, abort_after)


def prompt(i: int, n: int) -> list[int]:
    return [3 + (37 * i + 11 * j) % 500 for j in range(n)]


def test_a_step_is_launched_before_the_one_before_is_taken(path):
    worker = make_worker(path, **OPTIONS, async_scheduling=True)
    add(worker, "r", prompt(0, 10), temperature=0, max_tokens=5, ignore_eos=True)
    first = worker.step()
    assert first.deltas == [] and worker._in_flight is not None   # the first token is still in flight
    seq = worker.sequences["r"]
    assert seq.token_ids[-1] == PLACEHOLDER_TOKEN
    second = worker.step()   # launches the first decode, then takes the first token
    assert [len(d.new_token_ids) for d in second.deltas] == [1]
    assert seq.token_ids[-1] == PLACEHOLDER_TOKEN and seq.token_ids[-2] == second.deltas[0].new_token_ids[0]
    while worker.has_work():
        worker.step()
    assert not worker.sequences and not any(worker.pool.ref_counts)


def test_mixed_requests_give_the_synchronous_tokens(path):
    reference = make_worker(path, **OPTIONS, async_scheduling=False)
    probe, _, _ = drive(reference, {"p": (prompt(1, 9), dict(temperature=0, max_tokens=20, ignore_eos=True))})
    stop = probe["p"][6]   # a token the greedy stream reaches: it must end the request there
    requests = {
        "greedy": (prompt(0, 12), dict(temperature=0, max_tokens=17, ignore_eos=True)),
        "stops": (prompt(1, 9), dict(temperature=0, max_tokens=20, stop_token_ids=[stop])),
        "min": (prompt(1, 9), dict(temperature=0, max_tokens=20, min_tokens=12, stop_token_ids=[stop])),
        "seeded": (prompt(2, 30), dict(temperature=0.9, top_p=0.9, seed=7, max_tokens=15)),
        "logprobs": (prompt(3, 5), dict(temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)),
        "long": (prompt(4, 70), dict(temperature=0, max_tokens=9, ignore_eos=True)),   # chunked prefill
        "shared": (prompt(0, 12) + [9, 9, 9], dict(temperature=0, max_tokens=8, ignore_eos=True)),
        "one": (prompt(5, 4), dict(temperature=0, max_tokens=1)),
        "edge": (prompt(6, 120), dict(temperature=0, max_tokens=50, ignore_eos=True)),   # max_model_len
    }
    (sync_tokens, sync_finish, sync_outs), (tokens, finish, outs) = both(path, requests)
    assert tokens == sync_tokens and finish == sync_finish

    def logprobs(step_outputs):
        return [(e.logprob, e.top_token_ids, e.top_logprobs) for out in step_outputs for d in out.request_deltas()
                if d.request_id == "logprobs" for e in d.logprobs or []]
    assert logprobs(outs) == logprobs(sync_outs) and len(logprobs(outs)) == 6
    assert all(len(ids) == 2 for _, ids, _ in logprobs(outs))
    assert finish["stops"] == "stop" and tokens["stops"][-1] == stop and len(tokens["stops"]) == 7
    assert len(tokens["min"]) >= 12 and finish["edge"] == "length" and len(tokens["edge"]) == 8
    assert len(tokens["greedy"]) == 17 and len(tokens["one"]) == 1
    logprob_deltas = [d for out in outs for d in out.request_deltas() if d.request_id == "logprobs" and d.new_token_ids]
    assert all(len(d.logprobs) == len(d.new_token_ids) for d in logprob_deltas)


def test_penalties_wait_for_the_tokens_and_match(path):
    requests = {
        "penalised": (prompt(0, 8), dict(temperature=0, max_tokens=16, repetition_penalty=1.3,
                                         frequency_penalty=0.5, ignore_eos=True)),
        "plain": (prompt(1, 8), dict(temperature=0, max_tokens=24, ignore_eos=True)),
    }
    (sync_tokens, _, _), (tokens, _, _) = both(path, requests)
    assert tokens == sync_tokens


def test_sampling_that_reads_the_tokens_still_launches_ahead(path):
    """Penalties and a grammar read the tokens so far: the step's forward pass is launched before
    the step before is taken, its sampling queued once those tokens are in; the tokens are the
    synchronous worker's."""
    requests = {
        "penalised": (prompt(0, 8), dict(temperature=0, max_tokens=16, repetition_penalty=1.3,
                                         presence_penalty=0.4, ignore_eos=True)),
        "grammar": (prompt(1, 8), dict(temperature=0.8, seed=5, max_tokens=24,
                                       structured_outputs={"regex": "[a-z]{3,8}( [a-z]{3,8}){2,5}"})),
        "plain": (prompt(2, 8), dict(temperature=0, max_tokens=24, ignore_eos=True)),
    }
    (sync_tokens, sync_finish, _), (tokens, finish, _) = both(path, requests)
    assert tokens == sync_tokens and finish == sync_finish
    worker = make_worker(path, **OPTIONS, async_scheduling=True)
    calls: list[str] = []
    runner = worker.runner
    for name in ("launch", "finish", "sample"):
        def record(*args, _name=name, _original=getattr(runner, name), **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        setattr(runner, name, record)
    add(worker, "r", prompt(0, 10), temperature=0, max_tokens=6, repetition_penalty=1.3, ignore_eos=True)
    worker.step()
    calls.clear()
    second = worker.step()   # launches the first decode, then takes the first token, then samples
    assert calls == ["launch", "finish", "sample"]
    assert [len(d.new_token_ids) for d in second.deltas] == [1]
    seq = worker.sequences["r"]
    assert seq.token_ids[-1] == PLACEHOLDER_TOKEN and seq.token_ids[-2] == second.deltas[0].new_token_ids[0]
    while worker.has_work():
        worker.step()


def test_preemption_gives_the_synchronous_tokens(path):
    # 8 blocks of 8 tokens: four requests must preempt each other to reach 22 tokens.
    requests = {f"p{i}": (prompt(i, 10), dict(temperature=0, max_tokens=12, ignore_eos=True)) for i in range(4)}
    (sync_tokens, _, sync_outs), (tokens, _, outs) = both(path, requests, max_model_len=64, num_kv_blocks=8,
                                                          max_num_batched_tokens=64)
    assert sum(o.stats.num_preempted for o in outs) > 0
    assert tokens == sync_tokens and all(len(t) == 12 for t in tokens.values())


def test_aborts_while_a_step_is_in_flight(path):
    requests = {
        "a": (prompt(0, 20), dict(temperature=0, max_tokens=30, ignore_eos=True)),
        "b": (prompt(1, 20), dict(temperature=0, max_tokens=20, ignore_eos=True)),
    }
    (sync_tokens, sync_finish, _), (tokens, finish, _) = both(path, requests, abort_after={"a": 3})
    assert finish["a"] == "abort" and finish["b"] == "length"
    assert tokens["b"] == sync_tokens["b"]
    assert tokens["a"][:3] == sync_tokens["a"][:3]


def test_the_engine_streams_the_same_tokens(path):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 11, 3)]
    prompts = [{"prompt_token_ids": prompt(i, 6 + 5 * i)} for i in range(3)]
    outputs = {}
    for mode in (False, True):
        llm = local_llm(path, async_scheduling=mode, max_model_len=128)
        try:
            outputs[mode] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert outputs[True] == outputs[False]
    assert [len(t) for t in outputs[True]] == [5, 11, 3]


def test_tensor_parallel_ranks_share_the_sampled_tokens(path):
    """TP=2 (gloo): rank 0 broadcasts each step's tokens, the other rank fills its placeholders with them."""
    prompts = [{"prompt_token_ids": prompt(i, 5 + 9 * i)} for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=11, repetition_penalty=1.2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1)]
    outputs = {}
    for size, mode in ((1, False), (2, True)):
        with local_llm(path, worker_backend="process", tensor_parallel_size=size, async_scheduling=mode,
                       max_model_len=128) as llm:
            outputs[size] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs[2] == outputs[1]
    assert [len(t) for t in outputs[2]] == [14, 9, 11, 1]


def test_the_command_line_sets_it_either_way():
    import argparse

    from streamvlm.cli import add_engine_flags, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_config_from_args(parser.parse_args([])).scheduler.async_scheduling is None
    assert engine_config_from_args(parser.parse_args(["--async-scheduling"])).scheduler.async_scheduling is True
    assert engine_config_from_args(parser.parse_args(["--no-async-scheduling"])).scheduler.async_scheduling is False
