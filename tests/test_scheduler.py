"""Scheduler with a BlockPool and no model (steps are simulated), then aborts through a Worker."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_worker
from streamvlm.contract.protocol import AddRequest
from streamvlm.contract.sampling import SamplingParams
from workers.kv_cache import BlockPool
from workers.multimodal import MultiModalInput
from workers.scheduler import Scheduler, SchedulerOutput
from workers.sequence import Sequence, SequenceStatus

BS = 4


def make_seq(index: int, num_tokens: int, **params) -> Sequence:
    # Distinct tokens per sequence, so that no prefix is shared unless a test wants one.
    tokens = [1000 * (index + 1) + j for j in range(num_tokens)]
    return Sequence(f"s{index}", tokens, SamplingParams(**params), [2], index)


def make(num_blocks: int = 64, max_num_seqs: int = 8,
         max_num_batched_tokens: int = 16, **encoder) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks, BS, enable_prefix_caching=True)
    return Scheduler(pool, max_num_seqs, max_num_batched_tokens, **encoder), pool


def step(sched: Scheduler) -> SchedulerOutput:
    """One simulated engine step: schedule, 'run' the chunks, sample for completed ones."""
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    sampling = [c.seq for c in out.chunks if c.samples]
    for chunk in out.chunks:
        seq = chunk.seq
        assert seq.status is SequenceStatus.RUNNING
        assert chunk.start == seq.num_computed_tokens and chunk.num_tokens > 0
        # Every token computed this step has a KV slot.
        assert len(seq.block_table) * BS >= chunk.start + chunk.num_tokens
        seq.num_computed_tokens += chunk.num_tokens
        sched.pool.register_full_blocks(seq)
    for seq in sampling:
        seq.append_token(7, None)
    assert len({id(c.seq) for c in out.chunks}) == len(out.chunks)
    return out


def held(pool: BlockPool) -> int:
    return sum(1 for r in pool.ref_counts if r)


# --- chunked prefill ----------------------------------------------------------------------------

def test_long_prompt_is_split_across_steps():
    sched, pool = make(max_num_batched_tokens=16)
    seq = make_seq(0, 50)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        out = step(sched)
        assert len(out.chunks) == 1
        chunks.append((out.chunks[0].start, out.chunks[0].num_tokens, seq.num_output_tokens))
    assert chunks == [(0, 16, 0), (16, 16, 0), (32, 16, 0), (48, 2, 1)]
    # Then one token per step.
    out = step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(50, 1)]
    assert seq.num_output_tokens == 2 and len(seq.block_table) == 13


def test_budget_is_shared_between_prefills():
    sched, pool = make(max_num_batched_tokens=16)
    a, b = make_seq(0, 30), make_seq(1, 30)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 16)]   # b must wait
    out = step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 14), (b, 2)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    out = step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 1), (b, 15)]
    out = step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 1), (b, 13)]
    assert b.num_output_tokens == 1
    for _ in range(3):
        assert step(sched).num_tokens == 2


def test_max_num_seqs_is_respected():
    sched, pool = make(max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq(i, 5) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(3):
        out = step(sched)
        assert {c.seq.request_id for c in out.chunks} == {"s0", "s1"}
    assert list(sched.waiting) == seqs[2:]
    assert all(s.block_table == [] for s in seqs[2:])
    sched.remove(seqs[0])
    out = step(sched)
    assert [c.seq.request_id for c in out.chunks] == ["s1", "s2"]
    assert list(sched.waiting) == [seqs[3]]


def test_decodes_go_first_and_are_never_starved_by_a_long_prefill():
    sched, pool = make(max_num_batched_tokens=16)
    short, long = make_seq(0, 5), make_seq(1, 200)
    sched.add(short)
    sched.add(long)
    out = step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(short, 5), (long, 11)]
    steps = 0
    while long.num_output_tokens == 0:
        out = step(sched)
        steps += 1
        # The decode comes first and gets its token; the prefill takes the rest of the budget.
        assert out.chunks[0].seq is short and out.chunks[0].num_tokens == 1
        assert out.chunks[1].seq is long and out.chunks[1].num_tokens <= 15
        assert out.num_tokens <= 16
        assert short.num_output_tokens == 1 + steps
    assert steps == -(-(200 - 11) // 15)


def test_decodes_keep_their_order_before_prefills():
    sched, pool = make(max_num_batched_tokens=64)
    d1, p, d2 = make_seq(0, 3), make_seq(1, 3), make_seq(2, 3)
    for seq in (d1, p, d2):
        sched.add(seq)
    step(sched)
    # Give p a long stretch of uncomputed tokens: it is now a prefill between two decodes.
    p.token_ids.extend(range(40))
    p.num_prompt_tokens = p.num_tokens
    out = step(sched)
    assert [c.seq for c in out.chunks] == [d1, d2, p]
    assert [c.num_tokens for c in out.chunks] == [1, 1, 41]


# --- preemption ---------------------------------------------------------------------------------

def test_preemption_frees_the_newest_and_it_resumes():
    sched, pool = make(num_blocks=4, max_num_batched_tokens=64)
    a, b = make_seq(0, 6), make_seq(1, 6)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        assert step(sched).num_preempted == 0
    assert a.num_tokens == b.num_tokens == 9 and a.num_computed_tokens == 8
    assert pool.num_free_blocks == 0
    b_blocks = list(b.block_table)
    b_tokens = list(b.token_ids)

    # a needs a third block: b, the newest, is preempted.
    out = step(sched)
    assert out.num_preempted == 1
    assert [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and list(sched.waiting) == [b]
    assert sched.running == [a]
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert len(a.block_table) == 3
    assert sum(pool.ref_counts[blk] for blk in b_blocks) == 1   # one reused by a
    assert held(pool) == 3

    # While a holds 3 blocks, b (2 blocks) does not fit: it keeps waiting.
    out = step(sched)
    assert [c.seq for c in out.chunks] == [a] and b.status is SequenceStatus.WAITING

    # a finishes; b is readmitted, reusing its own cached first block, and recomputes the rest.
    sched.remove(a)
    assert held(pool) == 0
    out = step(sched)
    assert [c.seq for c in out.chunks] == [b]
    assert out.chunks[0].start == BS and out.chunks[0].num_tokens == 9 - BS
    assert b.block_table[0] == b_blocks[0]
    assert b.num_cached_tokens == 0   # cached-token counts are for the first admission only
    assert b.token_ids[:9] == b_tokens and b.num_tokens == 10
    step(sched)
    assert b.num_tokens == 11 and b.status is SequenceStatus.RUNNING


def test_preemption_picks_the_newest_running_sequence():
    sched, pool = make(num_blocks=6, max_num_batched_tokens=64)
    a, b, c = make_seq(0, 6), make_seq(1, 6), make_seq(2, 6)
    for seq in (a, b, c):
        sched.add(seq)
    for _ in range(3):
        assert step(sched).num_preempted == 0
    assert pool.num_free_blocks == 0
    out = step(sched)
    # a and b each need a block; preempting c (2 blocks) is enough for both.
    assert out.num_preempted == 1
    assert [s.status for s in (a, b, c)] == [SequenceStatus.RUNNING, SequenceStatus.RUNNING,
                                             SequenceStatus.WAITING]
    assert [x.seq for x in out.chunks] == [a, b]
    # Nothing is admitted in a step that preempted.
    assert list(sched.waiting) == [c]


def test_two_preemptions_in_one_step_requeue_in_arrival_order():
    sched, pool = make(num_blocks=5, max_num_batched_tokens=64)
    a = make_seq(0, 8)
    sched.add(a)
    step(sched)   # a's two prompt blocks are now cached
    # b and c share a's prompt blocks, so preempting one of them frees a single block.
    b = Sequence("b", a.token_ids[:8] + [500], SamplingParams(), [2], 1)
    c = Sequence("c", a.token_ids[:8] + [501], SamplingParams(), [2], 2)
    sched.add(b)
    sched.add(c)
    step(sched)
    assert b.block_table[:2] == c.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == c.num_cached_tokens == 8
    assert pool.num_free_blocks == 0 and pool.ref_counts[a.block_table[0]] == 3
    for _ in range(3):
        out = step(sched)
        assert out.num_preempted == 0
    # All three cross into a fourth block: c goes for a, then b has no victim but itself.
    assert a.num_tokens == b.num_tokens == c.num_tokens == 13
    out = step(sched)
    assert out.num_preempted == 2
    assert [x.seq for x in out.chunks] == [a] and sched.running == [a]
    assert list(sched.waiting) == [b, c]
    assert b.block_table == [] and c.block_table == []
    assert pool.ref_counts[a.block_table[0]] == 1
    # a finishes; b (the older) resumes first, from its cached prefix.
    sched.remove(a)
    out = step(sched)
    assert out.chunks[0].seq is b and out.chunks[0].start == 12
    assert b.status is SequenceStatus.RUNNING


def test_remove_frees_blocks_at_once():
    sched, pool = make(num_blocks=8, max_num_batched_tokens=64)
    a, b, w = make_seq(0, 9), make_seq(1, 5), make_seq(2, 30)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.add(w)
    blocks = list(a.block_table)
    assert blocks and held(pool) == 5
    sched.remove(a)
    assert a.status is SequenceStatus.FINISHED and a not in sched.running
    assert all(pool.ref_counts[blk] == 0 for blk in blocks)
    assert held(pool) == 2 and a.block_table == []
    # Removing a waiting sequence works too.
    sched.remove(w)
    assert not sched.waiting and w.status is SequenceStatus.FINISHED
    out = step(sched)
    assert [c.seq for c in out.chunks] == [b]
    sched.remove(b)
    assert held(pool) == 0 and not sched.has_work()


def test_scheduler_drains_with_no_leaked_blocks():
    sched, pool = make(num_blocks=12, max_num_seqs=3, max_num_batched_tokens=12)
    seqs = [make_seq(i, 3 + 5 * i) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(200):
        if not sched.has_work():
            break
        step(sched)
        for seq in list(sched.running):
            if seq.num_output_tokens >= 6:
                sched.remove(seq)
        assert held(pool) <= pool.num_blocks
    assert not sched.has_work()
    assert all(s.num_output_tokens == 6 for s in seqs)
    assert held(pool) == 0


# --- encoder budget -----------------------------------------------------------------------------

ENCODED = torch.empty(0)   # stands in for an encoder output


def image(item_hash: str, offset: int, num_tokens: int) -> MultiModalInput:
    return MultiModalInput(item_hash, offset, num_tokens, "embeds", "image", ENCODED)


def with_images(seq: Sequence, *items: MultiModalInput) -> Sequence:
    seq.mm_items = list(items)
    return seq


def encoding_step(sched: Scheduler) -> tuple[SchedulerOutput, list[str]]:
    """step(), keeping encoder outputs as the worker does; also the hashes the step encodes."""
    out = step(sched)
    encoded: list[str] = []
    for chunk in out.chunks:
        seq = chunk.seq
        for item in seq.mm_items:
            reached = item.offset < chunk.start + chunk.num_tokens and item.end > chunk.start
            if not reached or item.hash in seq.encoder_outputs:
                continue
            if not sched.is_encoded(item.hash) and item.hash not in encoded:
                encoded.append(item.hash)
            seq.encoder_outputs[item.hash] = ENCODED
        seq.release_encoder_outputs()
    return out, encoded


def spans(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks]


def test_encoder_budget_cuts_a_chunk_before_the_image_that_does_not_fit():
    sched, pool = make(max_num_batched_tokens=64, max_num_encoder_tokens=8)
    seq = with_images(make_seq(0, 40), image("a", 10, 8), image("b", 24, 8))
    sched.add(seq)
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 0, 24)] and encoded == ["a"]   # the text before "b" still runs
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 24, 16)] and encoded == ["b"]
    assert seq.num_output_tokens == 1


def test_encoder_budget_is_shared_by_the_chunks_of_a_step():
    sched, pool = make(max_num_batched_tokens=64, max_num_encoder_tokens=12)
    sched.add(with_images(make_seq(0, 20), image("a", 4, 8)))
    sched.add(with_images(make_seq(1, 20), image("b", 6, 8)))
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 0, 20), ("s1", 0, 6)] and encoded == ["a"]
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 20, 1), ("s1", 6, 14)] and encoded == ["b"]


def test_an_image_larger_than_the_budget_runs_alone():
    sched, pool = make(max_num_batched_tokens=64, max_num_encoder_tokens=4)
    sched.add(with_images(make_seq(0, 16), image("a", 2, 10)))
    sched.add(with_images(make_seq(1, 16), image("b", 0, 10)))
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 0, 16)] and encoded == ["a"]
    assert [s.request_id for s in sched.waiting] == ["s1"]
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 16, 1), ("s1", 0, 16)] and encoded == ["b"]


def test_a_waiting_sequence_held_back_by_the_encoder_budget_keeps_its_place():
    sched, pool = make(max_num_batched_tokens=64, max_num_encoder_tokens=8)
    a = with_images(make_seq(0, 12), image("a", 0, 8))
    b = with_images(make_seq(1, 12), image("b", 0, 8))
    c = make_seq(2, 12)   # text only: it would fit, but does not overtake b
    for seq in (a, b, c):
        sched.add(seq)
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 0, 12)] and list(sched.waiting) == [b, c]
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 12, 1), ("s1", 0, 12), ("s2", 0, 12)] and encoded == ["b"]


def test_items_already_encoded_cost_no_encoder_budget():
    cached = {"cached"}
    sched, pool = make(max_num_batched_tokens=64, max_num_encoder_tokens=8,
                       is_encoded=cached.__contains__)
    sched.add(with_images(make_seq(0, 12), image("cached", 2, 8)))
    sched.add(with_images(make_seq(1, 12), image("cached", 2, 8)))
    sched.add(with_images(make_seq(2, 12), image("new", 2, 8)))
    sched.add(with_images(make_seq(3, 12), image("new", 2, 8)))   # encoded once for both
    sched.add(with_images(make_seq(4, 12), image("other", 2, 8)))
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 0, 12), ("s1", 0, 12), ("s2", 0, 12), ("s3", 0, 12), ("s4", 0, 2)]
    assert encoded == ["new"]


def test_an_image_its_sequence_holds_costs_nothing_in_later_chunks():
    sched, pool = make(max_num_batched_tokens=16, max_num_encoder_tokens=16)
    sched.add(with_images(make_seq(0, 30), image("a", 4, 16)))
    sched.add(with_images(make_seq(1, 8), image("b", 0, 4)))
    out, encoded = encoding_step(sched)
    assert spans(out) == [("s0", 0, 16)] and encoded == ["a"]
    out, encoded = encoding_step(sched)   # "a" is sliced from the sequence's output: b fits
    assert spans(out) == [("s0", 16, 14), ("s1", 0, 2)] and encoded == ["b"]


def test_decodes_run_every_step_while_images_wait_for_encoder_budget():
    sched, pool = make(max_num_batched_tokens=64, max_num_encoder_tokens=4)
    decoding = with_images(make_seq(0, 10), image("d", 0, 8))
    sched.add(decoding)
    encoding_step(sched)
    for i in range(1, 4):
        sched.add(with_images(make_seq(i, 10), image(f"i{i}", 0, 8)))
    for i in range(1, 4):
        out, encoded = encoding_step(sched)
        assert spans(out)[0] == ("s0", 9 + i, 1)
        assert encoded == [f"i{i}"] and len(out.chunks) == 1 + i   # earlier images now decode


# --- aborts through a Worker --------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(llama_path):
    return make_worker(llama_path, max_model_len=128, max_num_batched_tokens=32)


def add(worker, request_id: str, prompt: list[int], **params) -> None:
    worker.add_request(AddRequest(request_id=request_id, prompt_token_ids=prompt,
                                  params=SamplingParams(**params), eos_token_ids=[2]))


def test_worker_abort_frees_blocks_and_reports_abort(worker):
    add(worker, "a", list(range(3, 43)), temperature=0, max_tokens=40, ignore_eos=True)
    add(worker, "b", list(range(100, 110)), temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {"a": [], "b": []}
    finish = {}
    for _ in range(3):
        for delta in worker.step().request_deltas():
            tokens[delta.request_id] += delta.new_token_ids
    assert tokens["a"] and tokens["b"]   # both got past prefill (40 tokens > one step budget)
    a_blocks = list(worker.sequences["a"].block_table)
    assert a_blocks
    worker.abort(["a"])
    assert "a" not in worker.sequences
    assert all(worker.pool.ref_counts[blk] == 0 for blk in a_blocks)
    worker.abort(["a", "nonexistent"])   # aborting twice, or an unknown id, is a no-op

    out = worker.step()
    a_deltas = [d for d in out.request_deltas() if d.request_id == "a"]
    assert len(a_deltas) == 1
    assert a_deltas[0].finish_reason == "abort" and a_deltas[0].new_token_ids == []
    assert out.stats.num_running == 1
    for delta in out.request_deltas():
        if delta.request_id == "b":
            tokens["b"] += delta.new_token_ids
            finish["b"] = delta.finish_reason
    while worker.has_work():
        for delta in worker.step().request_deltas():
            assert delta.request_id == "b"
            tokens["b"] += delta.new_token_ids
            finish["b"] = delta.finish_reason
    assert finish["b"] == "length" and len(tokens["b"]) == 8
    assert all(r == 0 for r in worker.pool.ref_counts)
    assert worker.pool.num_free_blocks == worker.pool.num_blocks and not worker.sequences


def test_worker_abort_of_a_waiting_request(worker):
    add(worker, "w", list(range(3, 13)), temperature=0, max_tokens=4)
    worker.abort(["w"])
    out = worker.step()
    assert [(d.request_id, d.finish_reason) for d in out.request_deltas()] == [("w", "abort")]
    assert not worker.has_work()
    assert all(r == 0 for r in worker.pool.ref_counts)


def test_worker_finishes_everything_with_no_blocks_held(worker):
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40, 33)]
    params = [dict(temperature=0, max_tokens=6), dict(temperature=1.0, seed=1, max_tokens=9),
              dict(temperature=0, max_tokens=3, stop_token_ids=[2]),
              dict(temperature=0.7, max_tokens=12, min_tokens=12)]
    for i, (prompt, kw) in enumerate(zip(prompts, params)):
        add(worker, f"r{i}", prompt, **kw)
    finished = {}
    counts = {f"r{i}": 0 for i in range(len(prompts))}
    for _ in range(100):
        if not worker.has_work():
            break
        for delta in worker.step().request_deltas():
            counts[delta.request_id] += len(delta.new_token_ids)
            if delta.finish_reason:
                finished[delta.request_id] = delta.finish_reason
    assert set(finished) == set(counts)
    assert counts["r3"] == 12 and finished["r3"] == "length"
    assert all(r == 0 for r in worker.pool.ref_counts)


def test_worker_sends_plain_tokens_in_columns_and_the_rest_as_deltas(worker):
    add(worker, "plain", list(range(3, 8)), temperature=0, max_tokens=4, ignore_eos=True)
    add(worker, "lp", list(range(3, 9)), temperature=0, max_tokens=3, ignore_eos=True, logprobs=1)
    outs = []
    while worker.has_work():
        outs.append(worker.step())
    columns = [(r, i) for out in outs for r, i in zip(out.tokens.request_ids, out.tokens.output_index)]
    full = [(d.request_id, d.output_index, d.finish_reason) for out in outs for d in out.deltas]
    # Tokens 1 and 2 of "plain" are plain; its first (num_cached_tokens) and last (finish) are not,
    # nor is any token that carries logprobs.
    assert columns == [("plain", 1), ("plain", 2)]
    assert sorted(full) == [("lp", 0, None), ("lp", 1, None), ("lp", 2, "length"),
                            ("plain", 0, None), ("plain", 3, "length")]
    for out in outs:   # a request appears once per step, and request_deltas() has them all
        ids = [d.request_id for d in out.request_deltas()]
        assert len(ids) == len(set(ids)) == len(out.tokens) + len(out.deltas)
    tokens = [t for out in outs for d in out.request_deltas() if d.request_id == "plain"
              for t in d.new_token_ids]
    assert len(tokens) == 4 and tokens[1:3] == [t for out in outs for t in out.tokens.token_ids]


def drive(worker, requests: dict[str, list[int]], **params) -> tuple[dict[str, list[int]], int]:
    """Run requests to completion on worker; their output tokens and the number preempted."""
    for request_id, prompt in requests.items():
        add(worker, request_id, prompt, **params)
    tokens = {request_id: [] for request_id in requests}
    num_preempted = 0
    for _ in range(500):
        if not worker.has_work():
            break
        out = worker.step()
        num_preempted += out.stats.num_preempted
        for delta in out.request_deltas():
            tokens[delta.request_id] += delta.new_token_ids
    assert not worker.has_work()
    return tokens, num_preempted


def test_worker_preemption_gives_the_same_greedy_outputs(llama_path, worker):
    # 8 blocks of 8 tokens: four requests fit while their prompts (10 tokens) and first outputs
    # take 2 blocks each, and must preempt each other to reach 22 tokens (3 blocks).
    small = make_worker(llama_path, max_model_len=64, num_kv_blocks=8, block_size=8,
                        max_num_batched_tokens=64)
    requests = {f"p{i}": [5 + i] + list(range(200 + 7 * i, 209 + 7 * i)) for i in range(4)}
    params = dict(temperature=0, max_tokens=12, ignore_eos=True)
    expected, none_preempted = drive(worker, requests, **params)
    got, num_preempted = drive(small, requests, **params)
    assert none_preempted == 0 and num_preempted > 0
    assert got == expected
    assert all(len(t) == 12 for t in got.values())
    assert all(r == 0 for r in small.pool.ref_counts)
