"""One token per row from a batch of logits in one pass over them: greedy rows take the argmax,
sampled rows the Gumbel-max draw argmax(logits / temperature + G), G = -log(-log U), which draws
from softmax(logits / temperature) without computing it.

The uniform U of column c in a row comes from Philox on (the row's seed, c), made in registers: no
noise tensor, no softmax, no division pass, and the logits are read once in the dtype they come
in. A row's draw depends only on its seed and its logits, never on the batch beside it or on how
the vocabulary is split between programs (the split is always whole tiles of TILE columns, and the
counter of a column is fixed by TILE). Ties go to the lowest column, as torch.argmax.

For small batches each row is split across programs so every SM streams part of the vocabulary;
a second small kernel merges the pieces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.kernels.launch import multiprocessors

TILE = 4096                 # columns per loop step; fixed, since a column's Philox counter depends on it
_QUARTER = TILE // 4        # one Philox call gives four uniforms, for columns j, j + Q, j + 2Q, j + 3Q
_TARGET_PROGRAMS_PER_SM = 2
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _uniform(bits):
    """(0, 1) from the top 24 bits of a uint32, never 0 or 1 (so both logs stay finite)."""
    return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _keep_larger(x_ptr, vocab, col, bits, inv_temp, noise_scale, best, best_col, SAMPLED: tl.constexpr):
    """Per lane, the larger of the kept score and column col's; a lane's columns only grow, so a tie
    keeps the earlier column. A greedy row in a sampled batch has inv_temp 1 and noise_scale 0: its
    score is its logit, exactly."""
    score = tl.load(x_ptr + col, mask=col < vocab, other=float("-inf")).to(tl.float32)
    if SAMPLED:
        score = score * inv_temp - noise_scale * tl.log(-tl.log(_uniform(bits)))
    take = score > best
    return tl.where(take, score, best), tl.where(take, col, best_col)


@triton.jit
def _top_of(best, best_col, top, NO_COL: tl.constexpr):
    return tl.min(tl.where(best == top, best_col, NO_COL), 0)


# The integers change with the batch; specialising on them (== 1, multiple of 16) would compile anew
# while serving.
@triton.jit(do_not_specialize=["stride_row", "vocab", "tiles_per_split"])
def _gumbel_argmax_kernel(logits_ptr, stride_row, inv_temp_ptr, seed_ptr, out_ptr, part_val_ptr, part_col_ptr,
                          vocab, tiles_per_split, SAMPLED: tl.constexpr, SPLIT: tl.constexpr,
                          QUARTER: tl.constexpr):
    """Program (row, split): the best (score, column) of the split's tiles of the row."""
    NO_COL: tl.constexpr = 2147483647
    row = tl.program_id(0)
    split = tl.program_id(1)
    x_ptr = logits_ptr + row.to(tl.int64) * stride_row
    inv_temp = 1.0
    noise_scale = 0.0
    seed = 0
    if SAMPLED:
        inv_temp = tl.load(inv_temp_ptr + row)
        seed = tl.load(seed_ptr + row)
        noise_scale = tl.where(inv_temp == 0.0, 0.0, 1.0)
        inv_temp = tl.where(inv_temp == 0.0, 1.0, inv_temp)
    lane = tl.arange(0, QUARTER)
    b0 = tl.full([QUARTER], float("-inf"), tl.float32)
    c0 = tl.zeros([QUARTER], tl.int32)
    b1, c1, b2, c2, b3, c3 = b0, c0, b0, c0, b0, c0
    first_tile = split * tiles_per_split
    for t in range(first_tile, first_tile + tiles_per_split):
        base = t * (4 * QUARTER)
        if SAMPLED:
            r0, r1, r2, r3 = tl.randint4x(seed, (base // 4 + lane).to(tl.uint32))
        else:
            r0, r1, r2, r3 = lane, lane, lane, lane
        b0, c0 = _keep_larger(x_ptr, vocab, base + lane, r0, inv_temp, noise_scale, b0, c0, SAMPLED)
        b1, c1 = _keep_larger(x_ptr, vocab, base + QUARTER + lane, r1, inv_temp, noise_scale, b1, c1, SAMPLED)
        b2, c2 = _keep_larger(x_ptr, vocab, base + 2 * QUARTER + lane, r2, inv_temp, noise_scale, b2, c2, SAMPLED)
        b3, c3 = _keep_larger(x_ptr, vocab, base + 3 * QUARTER + lane, r3, inv_temp, noise_scale, b3, c3, SAMPLED)
    # The largest score of the four quarters' lanes, and the lowest column holding it.
    top = tl.maximum(tl.maximum(tl.max(b0, 0), tl.max(b1, 0)), tl.maximum(tl.max(b2, 0), tl.max(b3, 0)))
    col = tl.minimum(tl.minimum(_top_of(b0, c0, top, NO_COL), _top_of(b1, c1, top, NO_COL)),
                     tl.minimum(_top_of(b2, c2, top, NO_COL), _top_of(b3, c3, top, NO_COL)))
    col = tl.where(col == NO_COL, first_tile * 4 * QUARTER, col)   # every score -inf: the split's first column
    if SPLIT:
        tl.store(part_val_ptr + row * tl.num_programs(1) + split, top)
        tl.store(part_col_ptr + row * tl.num_programs(1) + split, col)
    else:
        tl.store(out_ptr + row, col.to(tl.int64))


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_val_ptr, part_col_ptr, out_ptr, num_splits, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    mask = i < num_splits
    values = tl.load(part_val_ptr + row * num_splits + i, mask=mask, other=float("-inf"))
    cols = tl.load(part_col_ptr + row * num_splits + i, mask=mask, other=2147483647)
    top = tl.max(values, 0)
    col = tl.min(tl.where(values == top, cols, 2147483647), 0)
    col = tl.where(col == 2147483647, 0, col)
    tl.store(out_ptr + row, col.to(tl.int64))


def plan_splits(num_rows: int, vocab: int, num_sms: int) -> int:
    """Programs per row: enough that the batch fills the SMs, never an empty one."""
    tiles = triton.cdiv(vocab, TILE)
    wanted = triton.cdiv(_TARGET_PROGRAMS_PER_SM * num_sms, max(num_rows, 1))
    return max(1, min(tiles, wanted))


def warm_up(vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every variant serving can launch (greedy or sampled, split or not, the model's dtype
    and float32), so that no step stalls on a compile."""
    for logits_dtype in {dtype, torch.float32}:
        for rows in (1, 2 * multiprocessors(device.index or 0) + 1):
            logits = torch.zeros(rows, vocab, dtype=logits_dtype, device=device)
            gumbel_argmax(logits)
            gumbel_argmax(logits, torch.ones(rows, device=device), torch.zeros(rows, dtype=torch.int64, device=device))


def gumbel_argmax(logits: torch.Tensor, inv_temperatures: torch.Tensor | None = None,
                  seeds: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """Token ids [B] (int64) from logits [B, V] (any float dtype, rows may be strided).

    Without inverse temperatures every row is greedy. With them (float32 [B]), a row whose inverse
    temperature is 0 is greedy and the others draw with their seed (int64 [B])."""
    rows, vocab = logits.shape
    if vocab >= _INT32_MAX - TILE:
        raise ValueError(f"a vocabulary of {vocab} columns is past the sampler's int32 column index")
    sampled = inv_temperatures is not None
    assert logits.stride(-1) == 1
    assert not sampled or (inv_temperatures.dtype == torch.float32 and seeds is not None
                           and seeds.dtype == torch.int64)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if splits is None:
        num_sms = multiprocessors(logits.device.index or 0) if logits.device.type == "cuda" else 1
        splits = plan_splits(rows, vocab, num_sms)
    tiles = triton.cdiv(vocab, TILE)
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    parts_val = torch.empty(rows, splits, dtype=torch.float32, device=logits.device) if splits > 1 else out
    parts_col = torch.empty(rows, splits, dtype=torch.int32, device=logits.device) if splits > 1 else out
    _gumbel_argmax_kernel[(rows, splits)](
        logits, logits.stride(0), inv_temperatures if sampled else out, seeds if sampled else out, out,
        parts_val, parts_col, vocab, tiles_per_split, SAMPLED=sampled, SPLIT=splits > 1, QUARTER=_QUARTER,
        num_warps=8)
    if splits > 1:
        # BLOCK from the vocabulary, not the split count: one variant per model.
        _merge_splits_kernel[(rows,)](parts_val, parts_col, out, splits, BLOCK=triton.next_power_of_2(tiles))
    return out
