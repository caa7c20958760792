"""Messages among the ranks of one tensor-parallel worker group, from rank 0 to the others.
The engine core never sees them: they are the group's own business, so they live here and not in
the core<->worker contract."""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np


class StepPlan(msgspec.Struct, tag=True):
    """One step's forward-pass inputs, from rank 0 to the other ranks of a tensor-parallel
    group (they hold no scheduler). The per-token and per-block arrays travel as raw bytes: the
    host builds them with numpy and copies them to the device in one go."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: bytes           # int64 per token: block id * block size + offset
    block_tables: bytes           # int32 [len(query_lens), block_table_width], row-major
    block_table_width: int
    query_lens: list[int]
    seq_lens: list[int]
    logits_rows: list[int]
    # M-RoPE models: (temporal, height, width) position rows instead of ``positions``.
    mrope_positions: list[list[int]] | None = None
    # Rows of the step's tokens that take encoder output instead of token embeddings; the
    # embeddings themselves follow over torch.distributed (rank 0 runs the encoder).
    mm_rows: list[int] = []
    # Async scheduling: input rows whose token is still being sampled by the step in flight;
    # placeholder_sources[i] is its row among that step's sampled tokens.
    placeholder_rows: list[int] = []
    placeholder_sources: list[int] = []
    # Async scheduling with tensor parallelism: rank 0 broadcasts the tokens it samples in this step, and
    # the other ranks keep them for the next step's placeholder rows.
    shares_sampled_tokens: bool = False
    # Prompt logprobs: rows whose logits every rank computes after the sampling rows' (the
    # vocabulary is gathered over the group), for rank 0 to reduce to logprobs.
    prompt_logits_rows: list[int] = []

    def slot_array(self) -> np.ndarray:
        return np.frombuffer(self.slot_mapping, dtype=np.int64)

    def table_array(self) -> np.ndarray:
        return np.frombuffer(self.block_tables, dtype=np.int32).reshape(len(self.query_lens),
                                                                        self.block_table_width)


class KVShardPlan(msgspec.Struct, tag=True, kw_only=True):
    """From rank 0 to the other ranks of a tensor-parallel group, between steps: "gather" the
    blocks' KV shards to rank 0 (to send them to a decode group), or "scatter" rank 0's shards
    (received from a prefill group) into the blocks."""

    op: Literal["gather", "scatter"]
    block_ids: list[int]
