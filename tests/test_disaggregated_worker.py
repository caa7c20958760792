"""The worker's half of disaggregated prefill/decode, driven by hand: a prefill worker computes
the prompt and the first token, hands its KV blocks to a decode worker, which continues with
exactly the tokens of one mixed worker; blocks are freed on both sides however it ends."""

from __future__ import annotations

from typing import Any

import pytest

from streamvlm import SamplingParams
from streamvlm.contract.protocol import AddRequest, StepOutput
from tests.helpers import make_worker
from workers.kv_transfer import KVHeader, unpack_shards

BS = 8
OPTIONS = dict(max_model_len=256, block_size=BS, num_kv_blocks=64, max_num_batched_tokens=32)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


class CapturingOutbox:
    """Stands in for the ZeroMQ PUSH sockets: keeps what the prefill worker sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, KVHeader, bytes]] = []

    def send(self, group_id: int, header: KVHeader, payload: bytes) -> None:
        self.sent.append((group_id, header, bytes(payload)))


def add(worker: Any, request_id: str, prompt: list[int], params: SamplingParams = GREEDY,
        **kv: Any) -> None:
    worker.add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt, params=params,
                                  eos_token_ids=[2], **kv))


def run_until_idle(worker: Any, limit: int = 200) -> list[StepOutput]:
    outs = []
    for _ in range(limit):
        if not worker.has_work():
            break
        outs.append(worker.step())
    return outs


def tokens(outs: list[StepOutput], request_id: str) -> list[int]:
    return [t for out in outs for d in out.request_deltas() if d.request_id == request_id for t in d.new_token_ids]


def events(outs: list[StepOutput], kind: str) -> list[Any]:
    return [e for out in outs for e in out.kv_events if e.kind == kind]


@pytest.fixture(params=[False, True], ids=["sync", "async"], autouse=True)
def scheduling(request, monkeypatch):
    """Every test also with async scheduling (the prefill side hands off from a step in flight)."""
    monkeypatch.setitem(OPTIONS, "async_scheduling", request.param)


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints["qwen3"]


def mixed_tokens(path, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    worker = make_worker(path, **OPTIONS)
    add(worker, "r", prompt, params)
    return tokens(run_until_idle(worker), "r")


def handoff(prefill: Any, decode: Any, request_id: str, prompt: list[int],
            params: SamplingParams = GREEDY) -> tuple[list[int], list[StepOutput], list[StepOutput]]:
    """The engine core's part, by hand: reserve on decode, prefill, send, receive, release."""
    outbox = prefill.kv_handoff.outbox = CapturingOutbox()
    add(decode, request_id, prompt, params, kv_role="decode")
    add(prefill, request_id, prompt, params, kv_role="prefill", kv_peer=1)
    [reserved] = events([decode.step()], "reserved")
    prefill_outs = run_until_idle(prefill)
    assert [e.request_id for e in events(prefill_outs, "prefilled")] == [request_id]
    first = tokens(prefill_outs, request_id)
    assert len(first) == 1
    prefill.send_kv(request_id, reserved.cached_blocks)
    (peer, header, payload), = outbox.sent
    assert peer == 1 and header.first_token == first[0] and header.start_block == reserved.cached_blocks
    outbox.sent.clear()
    decode.receive_kv(header, payload)
    decode_outs = run_until_idle(decode)
    assert [e.request_id for e in events(decode_outs, "received")] == [request_id]
    prefill.release_kv(request_id)
    return first + tokens(decode_outs, request_id), prefill_outs, decode_outs


def test_handoff_gives_the_mixed_tokens_and_frees_the_prefill_blocks(path):
    prompt = list(range(30, 71))   # 41 tokens: five full blocks and a partial one
    prefill, decode = make_worker(path, **OPTIONS), make_worker(path, **OPTIONS)
    got, _, decode_outs = handoff(prefill, decode, "r", prompt)
    assert got == mixed_tokens(path, prompt)
    assert not prefill.sequences and not any(prefill.pool.ref_counts)
    assert not decode.sequences and not any(decode.pool.ref_counts)
    assert decode_outs[-1].stats.num_kv_transfers == 1 and decode_outs[-1].stats.kv_bytes_received > 0


def test_seeded_sampling_continues_as_in_one_worker(path):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True)
    prompt = list(range(5, 22))
    prefill, decode = make_worker(path, **OPTIONS), make_worker(path, **OPTIONS)
    got, _, _ = handoff(prefill, decode, "s", prompt, params)
    assert got == mixed_tokens(path, prompt, params)


def test_blocks_the_decode_side_caches_are_not_sent(path):
    shared = list(range(100, 124))   # three full blocks
    prefill, decode = make_worker(path, **OPTIONS), make_worker(path, **OPTIONS)
    first, _, _ = handoff(prefill, decode, "a", shared + [7, 8, 9])
    outbox = prefill.kv_handoff.outbox
    add(decode, "b", shared + [4, 5], kv_role="decode")
    add(prefill, "b", shared + [4, 5], kv_role="prefill", kv_peer=1)
    [reserved] = events([decode.step()], "reserved")
    assert reserved.cached_blocks == 3
    run_until_idle(prefill)
    prefill.send_kv("b", reserved.cached_blocks)
    (_, header, payload), = outbox.sent
    assert header.start_block == 3 and header.num_blocks == 1
    assert unpack_shards(header, payload)[0].shape[2] == 1
    decode.receive_kv(header, payload)
    decode_outs = run_until_idle(decode)
    prefill.release_kv("b")
    assert len(tokens(decode_outs, "b")) == GREEDY.max_tokens - 1   # the first came from prefill
    assert not any(prefill.pool.ref_counts) and not any(decode.pool.ref_counts)
    assert first == mixed_tokens(path, shared + [7, 8, 9])


def test_blocks_stream_as_prefill_chunks_complete_them(path):
    """A SendKV that comes before the prefill ends: full blocks go chunk by chunk, the rest (with
    the partial block and the first token) after the first token; the decode side gets the same
    tokens as from one batch."""
    prompt = list(range(10, 60))   # 50 tokens: prefilled in chunks of 32 and 18
    prefill, decode = make_worker(path, **OPTIONS), make_worker(path, **OPTIONS)
    prefill.kv_handoff.outbox = outbox = CapturingOutbox()
    add(decode, "r", prompt, kv_role="decode")
    add(prefill, "r", prompt, kv_role="prefill", kv_peer=3)
    [reserved] = events([decode.step()], "reserved")
    prefill.send_kv("r", reserved.cached_blocks)
    assert outbox.sent == []   # nothing is computed yet
    prefill_outs = run_until_idle(prefill)
    batches = [(h.start_block, h.num_blocks, h.last) for _, h, _ in outbox.sent]
    assert batches == [(0, 4, False), (4, 2, False), (6, 1, True)]
    assert all(peer == 3 for peer, _, _ in outbox.sent)
    assert outbox.sent[-1][1].first_token == tokens(prefill_outs, "r")[0]
    for _, header, payload in outbox.sent:
        decode.receive_kv(header, payload)
    decode_outs = run_until_idle(decode)
    prefill.release_kv("r")
    assert tokens(prefill_outs, "r") + tokens(decode_outs, "r") == mixed_tokens(path, prompt)
    assert [e.num_bytes for e in events(decode_outs, "received")] == [sum(len(p) for _, _, p in outbox.sent)]
    assert not any(prefill.pool.ref_counts) and not any(decode.pool.ref_counts)


def test_aborts_free_blocks_on_both_sides_at_every_stage(path):
    prompt = list(range(40, 75))
    prefill, decode = make_worker(path, **OPTIONS), make_worker(path, **OPTIONS)
    prefill.kv_handoff.outbox = outbox = CapturingOutbox()
    # Reserved on decode, prefilled and waiting on prefill.
    add(decode, "x", prompt, kv_role="decode")
    add(prefill, "x", prompt, kv_role="prefill", kv_peer=1)
    decode.step()
    run_until_idle(prefill)
    assert any(prefill.pool.ref_counts) and any(decode.pool.ref_counts)
    prefill.abort(["x"])
    decode.abort(["x"])
    assert not any(prefill.pool.ref_counts) and not any(decode.pool.ref_counts)
    # KV that arrives after the decode side aborted is dropped.
    add(prefill, "y", prompt, kv_role="prefill", kv_peer=1)
    run_until_idle(prefill)
    prefill.send_kv("y", 0)
    (_, header, payload), = outbox.sent
    decode.receive_kv(header, payload)
    assert not decode.sequences and not any(decode.pool.ref_counts)
    prefill.abort(["y"])
    assert not any(prefill.pool.ref_counts)


def test_decode_side_waits_for_blocks_to_reserve(path):
    small = dict(OPTIONS, num_kv_blocks=40)   # 320 tokens: room for one 250-token prompt
    decode = make_worker(path, **small)
    add(decode, "a", list(range(3, 253)), kv_role="decode")
    add(decode, "b", list(range(5, 255)), kv_role="decode")
    assert [e.request_id for e in events([decode.step()], "reserved")] == ["a"]
    decode.abort(["a"])
    assert [e.request_id for e in events([decode.step()], "reserved")] == ["b"]
    decode.abort(["b"])
    assert not any(decode.pool.ref_counts)


def test_a_first_token_that_finishes_the_request_needs_no_handoff(path):
    prefill = make_worker(path, **OPTIONS)
    prefill.kv_handoff.outbox = CapturingOutbox()
    add(prefill, "one", list(range(10, 30)), SamplingParams(temperature=0, max_tokens=1),
        kv_role="prefill", kv_peer=1)
    outs = run_until_idle(prefill)
    assert [d.finish_reason for out in outs for d in out.request_deltas()] == ["length"]
    assert events(outs, "prefilled") == []
    assert not prefill.sequences and not any(prefill.pool.ref_counts)
