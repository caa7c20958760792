"""Messages between the engine core and a worker group (msgspec Structs, msgpack on the wire).

Core -> worker: AddRequest, AbortRequest. Worker -> core: one StepOutput per step, holding the
new tokens of every request that advanced (the common one-token case in columns, NewTokens),
never one message per token.

A worker group on another host joins first (JoinRequest -> JoinAccepted | JoinRefused on the
core's listen socket); afterwards both sides send Heartbeats when otherwise silent.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from streamvlm.contract.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]
# What a worker group does: prefill and decode both, or one side of a prefill/decode split.
GroupRole = Literal["mixed", "prefill", "decode"]


class TensorData(msgspec.Struct, array_like=True):
    """A dense array on the wire: torch dtype name ("float32", "bfloat16", ...), shape, bytes."""

    dtype: str
    shape: list[int]
    data: bytes


class PixelSteps(msgspec.Struct, array_like=True):
    """How a worker makes an "image_uint8" item's pixel values, on its device: each value v of
    channel c of the resized [H, W, 3] uint8 image becomes ``value_table[v, c]`` (float32 [256, 3]:
    the family's rescale and normalization, tabulated by the engine core with the same numpy code
    it would otherwise apply, so the results are the same to the bit); the values are then laid
    out as the family's encoder takes them: "qwen_patches" ([grid_h * grid_w, 3 * temporal *
    patch * patch], merge window by merge window) or "channels_first" ([3, H, W])."""

    value_table: TensorData
    layout: Literal["qwen_patches", "channels_first"]
    patch_size: int = 0
    merge_size: int = 0
    temporal_patch_size: int = 0


class MultiModalItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One image (or precomputed embedding) of a request and the placeholder tokens it fills.

    source "image_uint8": ``data`` is the image resized (and cropped) for the family's encoder,
    uint8 [H, W, 3], and ``pixel_steps`` says how the worker turns it into the pixel values;
    "pixels": ``data`` is the family's preprocessed pixel values (the layout of the
    transformers image processor for one image) and the worker runs the vision encoder;
    "embeds": ``data`` is already the encoder output, [num_tokens, embed width];
    "features": ``data`` goes through the checkpoint's projector for ``modality`` first.
    """

    hash: str
    offset: int                       # index of the first placeholder token in the prompt
    num_tokens: int                   # placeholder tokens the item fills, from offset on
    data: TensorData
    source: Literal["image_uint8", "pixels", "embeds", "features"] = "pixels"
    modality: str = "image"
    grid_thw: list[int] | None = None  # Qwen-VL families: (t, h, w) in vision patches
    pixel_steps: PixelSteps | None = None   # source "image_uint8"


class AddRequest(msgspec.Struct, tag=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = []
    mm_items: list[MultiModalItem] = []
    # Disaggregated prefill/decode: "prefill" computes the prompt and the first token, then
    # hands the KV to decode group ``kv_peer``; "decode" reserves blocks and waits for that KV.
    kv_role: GroupRole = "mixed"
    kv_peer: int = -1
    # The worker reports where the request's time went until its first token (WorkerTimings).
    collect_timings: bool = False
    # params.structured_outputs compiled by the engine core (an llguidance grammar, JSON text): the
    # worker masks the request's logits with it. Empty: unconstrained.
    grammar: str = ""


class AbortRequest(msgspec.Struct, tag=True, kw_only=True):
    request_ids: list[str]


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprob of one sampled token, and the top alternatives (ids and logprobs) when asked."""

    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities of a request's prompt tokens, each given the tokens before it: entry i is
    prompt token ``first_position + i`` (the first prompt token has none). ``ranks`` places each
    token among the vocabulary by logprob (1: the most likely); ``top_token_ids`` and
    ``top_logprobs`` hold the most likely alternatives at each position when asked."""

    first_position: int = 1
    token_logprobs: list[float] = []
    ranks: list[int] = []
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.token_logprobs)

    def extend(self, later: PromptLogprobs) -> None:
        """Append the entries of the positions right after these."""
        if later.first_position != self.first_position + len(self):
            raise ValueError(f"prompt logprobs from position {later.first_position} do not follow "
                             f"positions {self.first_position}..{self.first_position + len(self) - 1}")
        self.token_logprobs.extend(later.token_logprobs)
        self.ranks.extend(later.ranks)
        self.top_token_ids.extend(later.top_token_ids)
        self.top_logprobs.extend(later.top_logprobs)


class WorkerTimings(msgspec.Struct, array_like=True):
    """Where an AddRequest(collect_timings=True) spent its time in the worker until its first
    token. ``received`` is the worker's time.monotonic() when it took the request from its inbox
    (the core's clock too only when both run on one host); the other moments are seconds after
    ``received``, so that a core on another host can still place them on its own clock."""

    received: float
    attached: float          # its images turned into tensors, checked, M-RoPE positions made
    scheduled: float         # first put in a step
    encode_start: float      # the first encoder call that ran one of its images was launched
    encode_seconds: float    # those encoder calls' duration, measured on the device
    first_token: float       # its first token sampled and on the host
    num_prefill_steps: int   # steps that computed part of its prompt


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request gained in one step."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    # Index of new_token_ids[0] among the request's output tokens. Two groups stream one
    # prefill/decode request, so its deltas may reach the core out of order: the core puts them
    # back in order by it. -1: not positioned (applied as it comes; the core's own final events).
    output_index: int = -1
    # On the first token's delta of a request that asked for them; absent otherwise.
    timings: WorkerTimings | None = None
    # On the first token's delta of a request with params.prompt_logprobs: the whole prompt's.
    prompt_logprobs: PromptLogprobs | None = None


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
    kv_bytes_sent: int = 0           # prefill/decode KV transfers, since start
    kv_bytes_received: int = 0
    kv_receive_seconds: float = 0.0  # writing received blocks into the pool
    num_kv_transfers: int = 0        # received
    num_handoffs_held: int = 0       # requests holding blocks for a transfer now


class KVEvent(msgspec.Struct, array_like=True, omit_defaults=True):
    """A step in a request's prefill -> decode handoff.

    "reserved" (decode group: blocks are reserved; the first ``cached_blocks`` are cached here
    already), "prefilled" (prefill group: prompt computed, first token sent), "sent" (prefill
    group: ``num_bytes`` on their way), "received" (decode group: the KV is in its pool),
    "released" (prefill group: its blocks are free), "failed" (``error``)."""

    request_id: str
    kind: Literal["reserved", "prefilled", "sent", "received", "released", "failed"]
    cached_blocks: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


class NewTokens(msgspec.Struct, array_like=True):
    """The common case of a step's output, in columns: request ``request_ids[i]`` gained the one
    token ``token_ids[i]``, its output token number ``output_index[i]``, and nothing else (no
    logprobs, no end, not its first token). Three flat lists cost the worker and the core far
    less than one RequestDelta per request when a step advances hundreds of requests."""

    request_ids: list[str] = []
    token_ids: list[int] = []
    output_index: list[int] = []

    def __len__(self) -> int:
        return len(self.request_ids)


class StepOutput(msgspec.Struct, tag=True, kw_only=True):
    """One step of one worker group. A request appears at most once: in ``tokens`` when it only
    gained one token, in ``deltas`` otherwise."""

    step: int
    deltas: list[RequestDelta]
    stats: StepStats
    kv_events: list[KVEvent] = []
    tokens: NewTokens = msgspec.field(default_factory=NewTokens)

    def request_deltas(self) -> list[RequestDelta]:
        """Every request's delta, ``tokens`` spelled out as RequestDeltas (tests, tools)."""
        t = self.tokens
        return [*(RequestDelta(r, [token], output_index=i)
                  for r, token, i in zip(t.request_ids, t.token_ids, t.output_index)), *self.deltas]


class Shutdown(msgspec.Struct, tag=True):
    pass


class WorkerReady(msgspec.Struct, tag=True, kw_only=True):
    """Sent once the model is loaded and the KV pool allocated."""

    pid: int
    num_kv_blocks: int
    # The settings the group resolved for its device (workers.device_settings): never "auto".
    device: str
    dtype: str = ""
    attention_backend: str = ""
    async_scheduling: bool = False
    kv_address: str | None = None   # a decode group's KV inbox
    kv_store_address: str | None = None   # its torch.distributed rendezvous (kv_transport "peer")


class WorkerFailed(msgspec.Struct, tag=True, kw_only=True):
    """Sent instead of WorkerReady (or before dying) when the worker cannot go on."""

    error_type: str
    message: str


class Heartbeat(msgspec.Struct, tag=True):
    """Liveness of a remote group, both ways; any other message counts as well."""


# Each side of a remote group sends a Heartbeat at least this often when it has sent nothing else.
HEARTBEAT_INTERVAL_S = 1.0


class JoinRequest(msgspec.Struct, tag=True, kw_only=True):
    """A remote worker asks the engine core for a group to run."""

    hostname: str
    pid: int


class JoinAccepted(msgspec.Struct, tag=True, kw_only=True):
    """The group id, the core's EngineConfig (msgpack) and the ports of the group's sockets,
    bound on the host the worker connected to: ``input_port`` core -> worker (the worker's
    PULL), ``output_port`` worker -> core (the worker's PUSH)."""

    group_id: int
    config: bytes
    input_port: int
    output_port: int


class JoinRefused(msgspec.Struct, tag=True, kw_only=True):
    reason: str


class SendKV(msgspec.Struct, tag=True, kw_only=True):
    """To a prefill group: send the request's prompt blocks from ``skip_blocks`` on."""

    request_id: str
    skip_blocks: int


class ReleaseKV(msgspec.Struct, tag=True, kw_only=True):
    """To a prefill group: the decode group has the request's blocks; free them."""

    request_id: str


class ConnectKVPeers(msgspec.Struct, tag=True, kw_only=True):
    """To a prefill group: the KV inboxes of the decode groups, by group id, and with
    kv_transport "peer" their rendezvous stores."""

    addresses: dict[int, str]
    stores: dict[int, str] = {}


class AcceptKVPeers(msgspec.Struct, tag=True, kw_only=True):
    """To a decode group (kv_transport "peer"): make the links with these prefill groups."""

    prefill_groups: list[int]


CoreToWorker = (AddRequest | AbortRequest | Shutdown | Heartbeat | SendKV | ReleaseKV
                | ConnectKVPeers | AcceptKVPeers)
WorkerToCore = StepOutput | WorkerReady | WorkerFailed | Heartbeat
JoinReply = JoinAccepted | JoinRefused
