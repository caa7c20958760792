"""Messages between the engine core and a worker group (msgspec Structs, msgpack on the wire).

Core -> worker: AddRequest, AbortRequest. Worker -> core: one StepOutput per step, holding the
new tokens of every request that advanced, never one message per token.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from streamvlm.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


class TensorData(msgspec.Struct, array_like=True):
    """A dense array on the wire: torch dtype name ("float32", "bfloat16", ...), shape, bytes."""

    dtype: str
    shape: list[int]
    data: bytes


class MultiModalItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One image (or precomputed embedding) of a request and the placeholder tokens it fills.

    source "pixels": ``data`` is the family's preprocessed pixel values (the layout of the
    transformers image processor for one image) and the worker runs the vision encoder;
    "embeds": ``data`` is already the encoder output, [num_tokens, embed width];
    "features": ``data`` goes through the checkpoint's projector for ``modality`` first.
    """

    hash: str
    offset: int                       # index of the first placeholder token in the prompt
    num_tokens: int                   # placeholder tokens the item fills, from offset on
    data: TensorData
    source: Literal["pixels", "embeds", "features"] = "pixels"
    modality: str = "image"
    grid_thw: list[int] | None = None  # Qwen-VL families: (t, h, w) in vision patches


class AddRequest(msgspec.Struct, tag=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = []
    mm_items: list[MultiModalItem] = []


class AbortRequest(msgspec.Struct, tag=True, kw_only=True):
    request_ids: list[str]


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprob of one sampled token, and the top alternatives (ids and logprobs) when asked."""

    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request gained in one step."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    error: str | None = None


class StepStats(msgspec.Struct, kw_only=True):
    num_running: int = 0
    num_waiting: int = 0
    num_scheduled_tokens: int = 0
    num_free_blocks: int = 0
    num_used_blocks: int = 0      # held by live requests (free blocks may still cache prefixes)
    num_total_blocks: int = 0
    num_preempted: int = 0
    encoder_cache_hits: int = 0      # items found in the encoder cache, since start
    num_encoded_items: int = 0       # items run through the encoder, since start


class StepOutput(msgspec.Struct, tag=True, kw_only=True):
    step: int
    deltas: list[RequestDelta]
    stats: StepStats


class StepPlan(msgspec.Struct, tag=True):
    """One step's forward-pass inputs, from rank 0 to the other ranks of a tensor-parallel
    group (they hold no scheduler)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    query_lens: list[int]
    seq_lens: list[int]
    logits_rows: list[int]
    # M-RoPE models: (temporal, height, width) position rows instead of ``positions``.
    mrope_positions: list[list[int]] | None = None
    # Rows of the step's tokens that take encoder output instead of token embeddings; the
    # embeddings themselves follow over torch.distributed (rank 0 runs the encoder).
    mm_rows: list[int] = []


class Shutdown(msgspec.Struct, tag=True):
    pass


class WorkerReady(msgspec.Struct, tag=True, kw_only=True):
    """Sent once the model is loaded and the KV pool allocated."""

    pid: int
    num_kv_blocks: int
    device: str


class WorkerFailed(msgspec.Struct, tag=True, kw_only=True):
    """Sent instead of WorkerReady (or before dying) when the worker cannot go on."""

    error_type: str
    message: str


CoreToWorker = AddRequest | AbortRequest | Shutdown
WorkerToCore = StepOutput | WorkerReady | WorkerFailed
