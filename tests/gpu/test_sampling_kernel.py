"""The fused draw (workers/kernels/sampling.py) on the GPU: greedy rows equal torch's argmax, sampled
rows follow softmax(logits / temperature) and depend only on their seed, and the Sampler built on
it keeps its guarantees (seeded rows reproducible in any batch, filters that keep one token equal
greedy)."""

from __future__ import annotations

import pytest
import torch

from streamvlm.contract.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 151_936   # Qwen's: a partial last tile


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_greedy_equals_argmax(rows, dtype):
    from workers.kernels.sampling import gumbel_argmax

    torch.manual_seed(rows)
    padded = torch.randn(rows, VOCAB + 64, device="cuda").to(dtype)
    logits = padded[:, :VOCAB]   # strided rows, as the model's vocabulary slice
    logits[0, 5] = logits[0, VOCAB - 1] = logits[0].max() + 1   # a tie: the lower column wins
    expected = logits.float().argmax(-1)
    assert torch.equal(gumbel_argmax(logits), expected)
    greedy_in_sampled_kernel = gumbel_argmax(logits, torch.zeros(rows, device="cuda"),
                                             torch.arange(rows, device="cuda"))
    assert torch.equal(greedy_in_sampled_kernel, expected)


def test_draws_follow_the_softmax_and_depend_only_on_the_seed():
    from workers.kernels.sampling import gumbel_argmax

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, -2.0, 1.5, 0.2], device="cuda")
    n, temperature = 200_000, 0.8
    seeds = torch.randint(0, 2 ** 62, (n,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    inv = torch.full((n,), 1 / temperature, device="cuda")
    ids = gumbel_argmax(logits.repeat(n, 1), inv, seeds)
    counts = torch.bincount(ids, minlength=8).float() / n
    expected = torch.softmax(logits / temperature, -1)
    assert (counts - expected).abs().max().item() < 0.005, (counts, expected)
    # A row's draw is the same in a batch of 5 as in a batch of 200,000 (a different split plan).
    assert torch.equal(gumbel_argmax(logits.repeat(5, 1), inv[:5], seeds[:5]), ids[:5])
    # Over the whole vocabulary, with splits: the same seed and logits give the same token at any split.
    wide = torch.randn(4, VOCAB, device="cuda", dtype=torch.bfloat16)
    inv4, seeds4 = torch.ones(4, device="cuda"), torch.tensor([7, 7, 8, 9], device="cuda")
    draws = [gumbel_argmax(wide, inv4, seeds4, splits=s) for s in (1, 2, 7, 38)]
    assert all(torch.equal(d, draws[0]) for d in draws)


def _seq(output: list[int], **params):
    from workers.sequence import Sequence

    seq = Sequence("r", [1, 2, 3], SamplingParams(**params), [0], 0)
    for t in output:
        seq.append_token(t, None)
    return seq


def test_sampler_seeded_rows_reproduce_in_any_batch():
    from workers.sampler import Sampler

    sampler = Sampler(torch.device("cuda"), seed=0)
    assert sampler.fused_draw
    logits = torch.randn(1, VOCAB, device="cuda", dtype=torch.bfloat16)
    seeded = _seq([4, 5], temperature=1.0, seed=42)
    alone = sampler(logits.clone(), [seeded]).token_ids[0]
    others = [_seq([4], temperature=0.7), _seq([], temperature=0), _seq([9], temperature=1.0, top_p=0.9, seed=3),
              _seq([1, 1], temperature=1.0, top_k=20), _seq([], temperature=1.0, repetition_penalty=1.3)]
    batch = sampler(logits.repeat(6, 1), others[:2] + [seeded] + others[2:]).token_ids
    assert batch[2] == alone
    assert batch[1] == logits[0].float().argmax().item()
    # Later positions draw other noise.
    assert len({sampler(logits.clone(), [_seq([4] * k, temperature=1.0, seed=42)]).token_ids[0]
                for k in range(20)}) > 1


def test_sampler_filters_that_keep_one_token_equal_greedy():
    from workers.sampler import Sampler

    sampler = Sampler(torch.device("cuda"), seed=0)
    logits = torch.randn(5, VOCAB, device="cuda")   # float32: no tie at the top (filters keep any of a tie)
    variants = [dict(top_k=1), dict(top_k=1, seed=5), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-4)]
    seqs = [_seq([], **dict(dict(temperature=1.0), **kw)) for kw in variants]
    assert sampler(logits, seqs).token_ids == logits.float().argmax(-1).tolist()
