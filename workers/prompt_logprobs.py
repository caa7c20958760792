"""Prompt logprobs: the log-probability of each prompt token given the tokens before it, with its
rank and the top alternatives, taken from the hidden states of the steps that compute the prompt.

Position p's logits predict token p + 1, so a chunk computing prompt positions [start, end) gives
the logprobs of prompt tokens start + 1 .. end (the last prompt position's logits are the first
sampled token's, not a prompt token's). A sequence remembers how far it got
(``prompt_logprobs_end``), so a prompt recomputed after preemption is not reported twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamvlm.contract.protocol import PromptLogprobs
from workers.scheduler import ScheduledChunk
from workers.sequence import Sequence

# Logits are taken this many rows at a time: a whole prefill chunk's would be
# [max_num_batched_tokens, vocab] floats at once.
LOGITS_SLICE_ROWS = 256


def prompt_logprob_span(chunk: ScheduledChunk) -> tuple[int, int] | None:
    """Positions [lo, hi) of the chunk whose logits give prompt logprobs not taken yet; None if
    the chunk's sequence did not ask for them or the chunk gives none."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None:
        return None
    lo = max(chunk.start, seq.prompt_logprobs_end)
    hi = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
    return (lo, hi) if lo < hi else None


@dataclass
class PromptLogprobRequest:
    """Rank 0's record of one step's prompt-logprob rows: for each sequence, its first position
    and its number of rows, in row order; the tokens those rows predict; the top-k to keep."""

    seqs: list[Sequence]
    first_positions: list[int]
    counts: list[int]
    targets: list[int]
    top_k: int

    @classmethod
    def take(cls, chunks: list[ScheduledChunk]) -> PromptLogprobRequest | None:
        """The step's request, advancing each sequence's ``prompt_logprobs_end`` past its rows."""
        seqs, firsts, counts, targets = [], [], [], []
        for chunk in chunks:
            span = prompt_logprob_span(chunk)
            if span is None:
                continue
            lo, hi = span
            seq = chunk.seq
            seqs.append(seq)
            firsts.append(lo + 1)
            counts.append(hi - lo)
            targets.extend(seq.token_ids[lo + 1:hi + 1])
            seq.prompt_logprobs_end = hi
        if not seqs:
            return None
        return cls(seqs, firsts, counts, targets, max(s.params.prompt_logprobs for s in seqs))


@dataclass
class PromptLogprobTensors:
    """On the device: per row, the target token's logprob and rank, the top-k values and ids."""

    token_logprobs: torch.Tensor
    ranks: torch.Tensor
    top_logprobs: torch.Tensor
    top_token_ids: torch.Tensor

    def on_host(self) -> PromptLogprobTensors:
        """Pinned host copies, on their way from a CUDA device (the tensors themselves on CPU):
        ready once an event recorded after this call on the same stream is."""
        if self.token_logprobs.device.type != "cuda":
            return self

        def copy(values: torch.Tensor) -> torch.Tensor:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            return host
        return PromptLogprobTensors(copy(self.token_logprobs), copy(self.ranks),
                                    copy(self.top_logprobs), copy(self.top_token_ids))


def compute_prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, rows: list[int],
                            request: PromptLogprobRequest | None) -> PromptLogprobTensors | None:
    """Logits of ``rows`` of ``hidden``, LOGITS_SLICE_ROWS at a time. Every rank of a
    tensor-parallel group calls this with the same rows (compute_logits gathers the vocabulary
    over the group); only rank 0, which holds ``request``, reduces them to logprobs."""
    parts: list[tuple[torch.Tensor, ...]] = []
    index = torch.tensor(rows, dtype=torch.int64).to(hidden.device, non_blocking=True)
    targets = None
    if request is not None:
        targets = torch.tensor(request.targets, dtype=torch.int64).to(hidden.device, non_blocking=True)
    for lo in range(0, len(rows), LOGITS_SLICE_ROWS):
        logits = compute_logits(hidden[index[lo:lo + LOGITS_SLICE_ROWS]])
        if targets is None:
            continue
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, targets[lo:lo + LOGITS_SLICE_ROWS, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top = logprobs.topk(request.top_k, dim=-1)
        parts.append((chosen.squeeze(1), ranks, top.values, top.indices))
    if targets is None:
        return None
    return PromptLogprobTensors(*(torch.cat(column) for column in zip(*parts)))


def split_by_sequence(request: PromptLogprobRequest, tensors: PromptLogprobTensors
                      ) -> list[tuple[Sequence, PromptLogprobs]]:
    """The step's values (on the host, arrived) as one PromptLogprobs per sequence (its top-k
    only)."""
    values = tensors.token_logprobs.tolist()
    ranks = tensors.ranks.tolist()
    top_values = tensors.top_logprobs.tolist()
    top_ids = tensors.top_token_ids.tolist()
    out, row = [], 0
    for seq, first, count in zip(request.seqs, request.first_positions, request.counts):
        k = seq.params.prompt_logprobs
        end = row + count
        out.append((seq, PromptLogprobs(first, values[row:end], ranks[row:end],
                                        [ids[:k] for ids in top_ids[row:end]],
                                        [v[:k] for v in top_values[row:end]])))
        row = end
    return out
