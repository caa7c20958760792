"""Engine configuration: typed sections (model, cache, scheduler, parallel, image input, request
limits) in one EngineConfig, built from flat keyword arguments or a TOML file, and ``resolve()``,
the one step that turns the core's "auto"/None settings into concrete values.

Where each setting is resolved:

- ``resolve(config, text_config)`` (here, called once by the engine core before any worker starts)
  fills in whatever the core can know without a device: max_model_len (from the model's
  config), kv_transport, max_cuda_graph_batch_size, max_num_encoder_tokens, max_prompt_bytes.
  Workers receive the resolved config.
- device, dtype, attention_backend and async_scheduling depend on the device a worker group
  runs on. The engine core cannot know them without initializing CUDA in its own process, and a
  remote group runs on a host the core cannot see, so each worker group resolves them once, in
  ``workers.device_settings.resolve_for_device``, and reports the concrete values back in
  ``WorkerReady``. num_kv_blocks None is sized by the worker from the memory left once the
  model is loaded, and reported the same way.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from streamvlm.contract.generation_defaults import check_override
from streamvlm.contract.protocol import HEARTBEAT_INTERVAL_S, GroupRole

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
AttentionBackendName = Literal["auto", "torch", "triton", "flash_attn"]
KVTransport = Literal["auto", "zmq", "peer"]

DEFAULT_MODEL = "smollm2-135m"
# The default max_prompt_bytes per token of context: far above what text averages, so that only a
# prompt that could never fit is refused before it is tokenized.
PROMPT_BYTES_PER_TOKEN = 16
# The largest default max_cuda_graph_batch_size.
MAX_CUDA_GRAPH_BATCH = 512


def normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_at_least(section: msgspec.Struct, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The checkpoint and how it runs.

    ``model`` is a checkpoint folder, a ``.gguf`` file, or ``"smollm2-135m"`` (the embedded
    default). ``max_model_len`` None takes the model's ``max_position_embeddings``.
    """

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    load_format: LoadFormat = "auto"
    dtype: Dtype = "auto"
    device: Device = "auto"
    max_model_len: int | None = None
    seed: int = 0
    # "flash_attn": FlashAttention 4 (flash_attn.cute, pip install flash-attn-4) for prefill, our
    # Triton kernel for decode; Hopper or newer GPUs, bfloat16 / float16. "triton": our Triton
    # kernels throughout. "auto": flash_attn where it can run, else triton on CUDA (where triton
    # is importable), else torch (CPU).
    attention_backend: AttentionBackendName = "auto"
    # CUDA graphs for decode steps, captured per batch-size bucket at start-up; True: eager only.
    enforce_eager: bool = False
    # The largest decode batch that runs as a CUDA graph (None: max_num_seqs, at most 512).
    max_cuda_graph_batch_size: int | None = None
    # No tokenizer: prompts must be token ids and outputs carry no text (benchmarks).
    skip_tokenizer_init: bool = False
    # Benchmarks only: sample random tokens without a forward pass, to measure the engine core.
    skip_model_forward: bool = False
    # A Jinja chat template in place of the tokenizer's: a file (read when the engine starts) or
    # the template text itself.
    chat_template: str | None = None
    # "auto": the checkpoint's generation_config.json (temperature, top_p, top_k, min_p,
    # repetition_penalty, max_new_tokens) gives the defaults of request fields left unset;
    # "none": SamplingParams' own defaults.
    generation_config: Literal["auto", "none"] = "auto"
    # Generation-config keys (e.g. {"temperature": 0.6}) over the checkpoint's (or alone, with
    # generation_config "none").
    override_generation_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")
        if self.chat_template is not None and not self.chat_template.strip():
            raise ValueError("chat_template must be a file or a template, got an empty string")
        if self.override_generation_config is not None:
            check_override(self.override_generation_config)
        _check_at_least(self, ("max_model_len", "max_cuda_graph_batch_size"))


class CacheConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The paged KV cache and the encoder cache. ``num_kv_blocks`` None sizes the KV pool from
    free memory (in the worker, once the model is loaded)."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    # Encoder outputs kept by image hash (least recently used out), in placeholder tokens.
    encoder_cache_tokens: int = 32768

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        _check_at_least(self, ("num_kv_blocks",))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        _check_at_least(self, ("encoder_cache_tokens",), 0)


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Continuous batching: how many sequences and tokens one step takes."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Image placeholder tokens (whole items, cached ones free) the vision encoder may take in one
    # step: a burst of images is spread over several steps instead of stalling every decode for
    # one long step. A chunk is cut before the first image that does not fit. The first image of
    # a step always runs, even one larger than the whole budget (alone then), so none starves.
    # None: max_num_batched_tokens.
    max_num_encoder_tokens: int | None = None
    # Schedule and queue step N+1 while step N still runs on the device, its sampled tokens feeding
    # N+1 on the device. Steps with penalty sampling wait for the tokens instead. With tensor
    # parallelism rank 0 broadcasts the sampled tokens to the other ranks each step. None: on for CUDA
    # worker groups of one rank (resolved by each worker group for its device).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _check_at_least(self, ("max_num_seqs", "max_num_batched_tokens", "max_num_encoder_tokens"))


class GroupSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One worker group of ``ParallelConfig.groups``: what it does and where it runs."""

    role: GroupRole = "mixed"
    tensor_parallel_size: int = 1
    devices: list[int] | None = None     # CUDA devices of its ranks; None: the next free ones


class ParallelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Worker groups: replicas, tensor parallelism, prefill/decode disaggregation, how the worker
    processes run and how the engine core reaches them."""

    # "process": each worker group in its own spawned process. "thread": the same worker loop
    # and messages in a thread of this process (fast start, for tests and debugging).
    worker_backend: Literal["process", "thread"] = "process"
    # How the engine core reaches its workers: "ipc" (one host) or "tcp".
    worker_transport: Literal["ipc", "tcp"] = "ipc"
    # Data-parallel replicas: worker groups with their own scheduler and KV pool.
    num_replicas: int = 1
    # Processes (one device each) that hold one worker group's tensor-parallel shards.
    tensor_parallel_size: int = 1
    # CUDA device indices, num_replicas * tensor_parallel_size of them: group g, rank r uses
    # devices[g * tensor_parallel_size + r]. None: 0, 1, 2, ... in that order.
    devices: list[int] | None = None
    # Worker groups started on other hosts (`streamvlm worker --connect ADDRESS`), beside the
    # num_replicas local ones; the engine core waits for them to join at worker_listen_address
    # ("tcp://HOST:PORT"). They run this config, tensor_parallel_size 1 only.
    remote_worker_groups: int = 0
    worker_listen_address: str | None = None
    # A remote group silent this long is dead; a remote worker that hears nothing from the
    # engine core this long exits. Both sides send heartbeats every second.
    remote_worker_timeout_s: float = 5.0
    # A local worker process whose engine core is gone exits within this long, busy or idle (on
    # Linux the kernel ends it at once); it also bounds how long a worker waits, between checks
    # of its core, to queue output the core is not reading.
    worker_parent_timeout_s: float = 2.0
    # A worker group whose step loop has sent nothing (not even its heartbeat, every second)
    # for this long is unresponsive: health() reports it and new requests go to other groups
    # (or fail fast); it is healthy again once it speaks. Above the longest single step
    # (a first compiled step, a long prefill chunk).
    worker_step_timeout_s: float = 60.0
    # Disaggregated prefill/decode: one spec per worker group (a role name is short for a spec
    # of that role), e.g. [{"role": "prefill", "devices": [0]}, {"role": "decode", "devices":
    # [1]}]. Prefill groups compute prompts and first tokens and hand the KV blocks to decode
    # groups. None: num_replicas mixed groups of tensor_parallel_size.
    groups: list[GroupSpec | str] | None = None
    # A handoff (first token to the decode group holding the KV) that takes longer fails the
    # request with an error.
    kv_transfer_timeout_s: float = 30.0
    # How KV bytes travel between groups: "zmq" (ZeroMQ frames through host memory) or "peer"
    # (torch.distributed point-to-point between the groups' rank 0: gloo on CPU, NCCL on CUDA,
    # GPU to GPU). "auto" resolves to "zmq" for now.
    kv_transport: KVTransport = "auto"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.worker_backend == "thread":
            raise ValueError("tensor_parallel_size > 1 needs worker_backend='process'")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        self._check_remote_workers()
        self._check_groups()
        needed = self.num_replicas * self.tensor_parallel_size
        if self.devices is not None and len(self.devices) < needed:
            raise ValueError(f"devices lists {len(self.devices)} devices; num_replicas * "
                             f"tensor_parallel_size needs {needed}")

    def _check_groups(self) -> None:
        if self.kv_transfer_timeout_s <= 0:
            raise ValueError(f"kv_transfer_timeout_s must be > 0, got {self.kv_transfer_timeout_s}")
        if self.groups is None:
            return
        specs = []
        for entry in self.groups:
            try:
                if isinstance(entry, str):
                    entry = GroupSpec(role=msgspec.convert(entry, GroupRole))
                elif not isinstance(entry, GroupSpec):
                    entry = msgspec.convert(entry, GroupSpec)
            except msgspec.ValidationError as exc:
                raise ValueError(f"groups: {exc}") from exc
            specs.append(entry)
        self.groups = specs
        if not specs:
            raise ValueError("groups must list at least one group")
        roles = {spec.role for spec in specs}
        if roles & {"prefill", "decode"} and roles != {"prefill", "decode"}:
            raise ValueError(f"groups must have both prefill and decode groups and no mixed ones, "
                             f"got roles {sorted(roles)}")
        sizes = {spec.tensor_parallel_size for spec in specs}
        if min(sizes) < 1:
            raise ValueError("groups: tensor_parallel_size must be >= 1")
        if len(sizes) > 1:
            raise ValueError(f"groups: every group needs the same tensor_parallel_size (KV shards pair "
                             f"rank to rank), got {sorted(sizes)}")
        if max(sizes) > 1 and self.worker_backend == "thread":
            raise ValueError("groups with tensor_parallel_size > 1 need worker_backend='process'")
        for spec in specs:
            if spec.devices is not None and len(spec.devices) != spec.tensor_parallel_size:
                raise ValueError(f"groups: devices {spec.devices} must name tensor_parallel_size="
                                 f"{spec.tensor_parallel_size} devices")
        if self.num_replicas != 1 or self.tensor_parallel_size != 1:
            raise ValueError("groups replaces num_replicas and tensor_parallel_size: leave them at 1")
        if self.remote_worker_groups:
            raise ValueError("groups and remote_worker_groups cannot be combined yet")

    def _check_remote_workers(self) -> None:
        if self.remote_worker_groups < 0:
            raise ValueError(f"remote_worker_groups must be >= 0, got {self.remote_worker_groups}")
        if self.worker_parent_timeout_s <= 0:
            raise ValueError(f"worker_parent_timeout_s must be > 0, got {self.worker_parent_timeout_s}")
        if self.worker_step_timeout_s <= HEARTBEAT_INTERVAL_S:
            raise ValueError(f"worker_step_timeout_s must be > {HEARTBEAT_INTERVAL_S:g} (the heartbeat "
                             f"interval), got {self.worker_step_timeout_s}")
        if self.remote_worker_timeout_s <= 0:
            raise ValueError(
                f"remote_worker_timeout_s must be > 0, got {self.remote_worker_timeout_s}")
        if self.worker_listen_address is not None:
            tcp_host_port(self.worker_listen_address, "worker_listen_address")
        if self.remote_worker_groups == 0:
            return
        if self.worker_listen_address is None:
            raise ValueError("remote_worker_groups > 0 needs worker_listen_address "
                             "(e.g. 'tcp://0.0.0.0:7000')")
        if self.tensor_parallel_size > 1:
            raise ValueError("remote_worker_groups needs tensor_parallel_size 1: a tensor-"
                             "parallel group across hosts is not supported")

    @property
    def group_specs(self) -> list[GroupSpec]:
        """The local worker groups: ``groups``, or num_replicas mixed groups."""
        if self.groups is not None:
            return list(self.groups)   # GroupSpecs after __post_init__
        return [GroupSpec(tensor_parallel_size=self.tensor_parallel_size) for _ in range(self.num_replicas)]


class ImageInputConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The image-input limits (VLMs), declared once: the input pipeline reads them from here."""

    max_images_per_request: int = 8
    # Longest side in pixels; larger images shrink to it, keeping the aspect ratio.
    max_image_size: int = 4096
    # width * height from the header; larger images are refused before their pixels are decoded.
    max_image_pixels: int = 40_000_000
    # Encoded size: raw bytes, decoded base64, file size, downloaded body.
    max_image_bytes: int = 20 * 2**20
    # http(s) image URLs: off unless enabled; loopback, private and link-local addresses stay
    # refused unless their host is listed in allowed_image_hosts.
    allow_remote_images: bool = False
    # Hosts, IPs or networks (CIDR) that may be fetched even on loopback/private/link-local addresses.
    allowed_image_hosts: tuple[str, ...] = ()
    allow_local_image_paths: bool = False
    # Bounds a whole remote fetch: resolving, connecting, redirects and the body.
    image_fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        _check_at_least(self, ("max_images_per_request", "max_image_size", "max_image_pixels",
                               "max_image_bytes"))
        if not self.image_fetch_timeout > 0:
            raise ValueError(f"image_fetch_timeout must be > 0, got {self.image_fetch_timeout}")
        self.allowed_image_hosts = tuple(normalize_host(str(host))
                                         for host in self.allowed_image_hosts or ())


class RequestLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Admission control and request input limits, checked before anything is queued."""

    # Requests the engine core holds at once, from the moment they are submitted (prompts still
    # being prepared count, so a flood of images is bounded too) to their final event; past it a
    # request fails at once with EngineOverloadedError (HTTP 429). 1024 is 16 full batches of the
    # default max_num_seqs: enough queue to keep one GPU server busy, small enough that queued
    # prompts and images cannot exhaust host memory.
    max_pending_requests: int = 1024
    # Stop strings: how many, and the characters of each.
    max_stop_strings: int = 16
    max_stop_length: int = 1024
    # A text prompt's (or a chat's message texts') UTF-8 bytes before it is tokenized; None: 16
    # bytes per token of max_model_len.
    max_prompt_bytes: int | None = None
    # Decoded image pixels (width * height) in flight across requests: an image waits until its
    # pixels fit (one larger than the whole budget waits until it is alone).
    max_pending_image_pixels: int = 160_000_000
    # Special-token text (such as "<|im_end|>") in chat message content is tokenized as plain
    # text unless this is on.
    allow_special_tokens_in_content: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_pending_requests, int) or self.max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be an integer >= 1, got {self.max_pending_requests!r}")
        _check_at_least(self, ("max_stop_strings", "max_stop_length", "max_prompt_bytes",
                               "max_pending_image_pixels"))


# EngineConfig's sections: the attribute name and the section type.
SECTIONS: dict[str, type[msgspec.Struct]] = {
    "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
    "parallel": ParallelConfig, "image": ImageInputConfig, "limits": RequestLimits,
}
# Every setting's flat name -> the section holding it (names are unique across sections).
SECTION_OF: dict[str, str] = {field.name: section for section, cls in SECTIONS.items()
                              for field in msgspec.structs.fields(cls)}
assert len(SECTION_OF) == sum(len(msgspec.structs.fields(cls)) for cls in SECTIONS.values())

# One line per setting: the CLI's --help and the README's settings table. The comments on the
# fields above say more.
FIELD_HELP: dict[str, str] = {
    "model": "a checkpoint folder, a .gguf file, or smollm2-135m (the embedded default)",
    "tokenizer": "a tokenizer folder in place of the checkpoint's",
    "load_format": "how the weights are read",
    "dtype": "weight and activation dtype; auto: bfloat16 on CUDA where supported, else float32",
    "device": "where workers run; auto: cuda if available, else cpu",
    "max_model_len": "context length in tokens; None: the model's max_position_embeddings",
    "seed": "seed of the workers' random state (weights of dummy models, sampling without a seed)",
    "attention_backend": "attention kernels; auto: flash_attn where it runs, else triton on "
                         "CUDA, else torch",
    "enforce_eager": "no CUDA graphs for decode steps",
    "max_cuda_graph_batch_size": "largest decode batch run as a CUDA graph; None: max_num_seqs, "
                                 "at most 512",
    "skip_tokenizer_init": "no tokenizer: prompts are token ids, outputs carry no text",
    "skip_model_forward": "benchmarks: sample random tokens without a forward pass",
    "chat_template": "a Jinja chat template file (or the template text) replacing the "
                     "tokenizer's",
    "generation_config": "auto: the checkpoint's generation_config.json gives default sampling "
                         "parameters; none: ignore it",
    "override_generation_config": "JSON object of generation-config keys over the checkpoint's, "
                                  "e.g. '{\"temperature\": 0.6}'",
    "block_size": "tokens per KV-cache block (a power of two)",
    "num_kv_blocks": "KV-cache blocks per worker group; None: sized from free memory",
    "gpu_memory_utilization": "fraction of GPU memory the worker may use (weights and KV cache)",
    "cpu_kv_cache_gib": "KV-cache memory in GiB when the worker runs on the CPU",
    "enable_prefix_caching": "reuse KV blocks of prompts that share a prefix",
    "encoder_cache_tokens": "vision-encoder outputs kept by image hash, in placeholder tokens",
    "max_num_seqs": "sequences in one step at most",
    "max_num_batched_tokens": "tokens in one step at most (the prefill chunk budget)",
    "max_num_encoder_tokens": "image placeholder tokens encoded in one step at most; an image "
                              "larger than this runs alone in a step; None: max_num_batched_tokens",
    "async_scheduling": "schedule step N+1 while step N runs; None: on for one-rank CUDA groups",
    "worker_backend": "process: a spawned process per worker group; thread: a thread here",
    "worker_transport": "how the engine core reaches its workers: ipc (one host) or tcp",
    "num_replicas": "data-parallel worker groups, each with its own scheduler and KV pool",
    "tensor_parallel_size": "devices holding the shards of one worker group",
    "devices": "CUDA device indices, num_replicas * tensor_parallel_size of them; None: 0, 1, ...",
    "remote_worker_groups": "worker groups started on other hosts with `streamvlm worker "
                            "--connect`",
    "worker_listen_address": "where remote worker groups join, tcp://HOST:PORT",
    "remote_worker_timeout_s": "seconds of silence after which a remote worker group is dead",
    "worker_parent_timeout_s": "seconds within which a worker whose engine core is gone exits",
    "worker_step_timeout_s": "seconds without a word after which a worker group is unresponsive",
    "groups": "prefill/decode worker groups by role, e.g. prefill,decode (TOML: full specs)",
    "kv_transfer_timeout_s": "seconds a prefill-to-decode KV handoff may take",
    "kv_transport": "how KV blocks travel between groups; auto: zmq",
    "max_images_per_request": "images in one request at most",
    "max_image_size": "longest image side in pixels; larger images shrink to it",
    "max_image_pixels": "width * height at most; larger images are refused before decoding",
    "max_image_bytes": "encoded image bytes at most",
    "allow_remote_images": "fetch http(s) image URLs",
    "allowed_image_hosts": "hosts, IPs or CIDR networks fetched even on private addresses",
    "allow_local_image_paths": "read images from local file paths named in requests",
    "image_fetch_timeout": "seconds a whole remote image fetch may take",
    "max_pending_requests": "requests held at once; past it new ones fail with 429",
    "max_stop_strings": "stop strings per request at most",
    "max_stop_length": "characters per stop string at most",
    "max_prompt_bytes": "UTF-8 bytes of a prompt at most; None: 16 per token of max_model_len",
    "max_pending_image_pixels": "decoded image pixels in flight across requests at most",
    "allow_special_tokens_in_content": "tokenize special-token text in chat content as special "
                                       "tokens",
}
assert FIELD_HELP.keys() == SECTION_OF.keys(), sorted(FIELD_HELP.keys() ^ SECTION_OF.keys())


def split_flat(settings: dict[str, Any], *, unknown: type[Exception] = ValueError
               ) -> dict[str, dict[str, Any]]:
    """Flat setting names -> {section: {name: value}}. A section name with a table (a dict, as
    a TOML ``[cache]`` table) merges that table in; a section instance is taken whole."""
    nested: dict[str, Any] = {}
    for name, value in settings.items():
        if name in SECTIONS and (isinstance(value, dict) or isinstance(value, SECTIONS[name])):
            if isinstance(value, SECTIONS[name]):
                nested[name] = value
            else:
                nested.setdefault(name, {}).update(value)
        elif name in SECTION_OF:
            nested.setdefault(SECTION_OF[name], {})[name] = value
        else:
            raise unknown(f"Unexpected keyword argument '{name}'" if unknown is TypeError
                          else f"invalid engine config: unknown field `{name}`")
    return nested


class _FlatKeywords(msgspec.StructMeta):
    """``EngineConfig(block_size=32, max_num_seqs=8)``: flat setting names, each routed to its
    section (msgspec Structs cannot define ``__init__``). Section instances pass as they are:
    ``EngineConfig(cache=CacheConfig(...))``. Decoding and msgspec.convert skip this."""

    def __call__(cls, **settings: Any) -> Any:
        nested = split_flat(settings, unknown=TypeError)
        sections = {name: value if isinstance(value, msgspec.Struct) else SECTIONS[name](**value)
                    for name, value in nested.items()}
        return super().__call__(**sections)


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, metaclass=_FlatKeywords):
    """Everything that shapes an engine, in sections: ``config.model.max_model_len``,
    ``config.cache.block_size``, ``config.scheduler.max_num_seqs``,
    ``config.parallel.tensor_parallel_size``, ``config.image.max_image_size``,
    ``config.limits.max_pending_requests``. Built from flat names (``EngineConfig(block_size=32)``,
    ``from_kwargs``, ``from_toml``, CLI flags), each routed to its section."""

    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    image: ImageInputConfig = msgspec.field(default_factory=ImageInputConfig)
    limits: RequestLimits = msgspec.field(default_factory=RequestLimits)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (or section tables), turning type mistakes into
        ValueError."""
        try:
            return msgspec.convert(split_flat(kwargs), cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid engine config: {exc}") from exc

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """Load a ``configs/*.toml`` file of flat keys (or ``[cache]``-style section tables);
        keyword overrides (e.g. CLI flags) win."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        nested = split_flat(data)
        for name, value in split_flat({k: v for k, v in overrides.items() if v is not None}).items():
            nested.setdefault(name, {}).update(value)
        return cls.from_kwargs(**nested)

    def replace(self, **settings: Any) -> EngineConfig:
        """A copy with these flat settings changed (checked again)."""
        sections = {name: msgspec.structs.replace(getattr(self, name), **values)
                    for name, values in split_flat(settings).items()}
        return msgspec.structs.replace(self, **sections)


def resolve_max_model_len(config: EngineConfig, hf_config: dict[str, Any]) -> int:
    model_limit = hf_config.get("max_position_embeddings")
    max_model_len = config.model.max_model_len
    if max_model_len is None:
        if model_limit is None:
            raise ValueError("the model config has no max_position_embeddings: set max_model_len")
        return int(model_limit)
    if model_limit is not None and max_model_len > model_limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings={model_limit}")
    return max_model_len


def resolve(config: EngineConfig, text_config: dict[str, Any]) -> EngineConfig:
    """The config with every "auto"/None the engine core can know made concrete: called once,
    before any worker starts; workers receive what it returns. ``text_config``: the model's
    (language model's) Hugging Face config, ``ModelSource.text_config``. Device-dependent
    settings are left to each worker group (see the module docstring)."""
    max_model_len = resolve_max_model_len(config, text_config)
    model = msgspec.structs.replace(
        config.model, max_model_len=max_model_len,
        max_cuda_graph_batch_size=(config.model.max_cuda_graph_batch_size
                                   or min(config.scheduler.max_num_seqs, MAX_CUDA_GRAPH_BATCH)))
    parallel = config.parallel
    if parallel.kv_transport == "auto":
        parallel = msgspec.structs.replace(parallel, kv_transport="zmq")
    scheduler = msgspec.structs.replace(
        config.scheduler,
        max_num_encoder_tokens=(config.scheduler.max_num_encoder_tokens
                                or config.scheduler.max_num_batched_tokens))
    limits = msgspec.structs.replace(
        config.limits,
        max_prompt_bytes=config.limits.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * max_model_len)
    return msgspec.structs.replace(config, model=model, scheduler=scheduler, parallel=parallel,
                                   limits=limits)


def check_resolved(config: EngineConfig) -> None:
    """ValueError unless ``config`` came out of resolve() (what the input pipeline and the
    workers are built from)."""
    if (config.model.max_model_len is None or config.model.max_cuda_graph_batch_size is None
            or config.scheduler.max_num_encoder_tokens is None
            or config.limits.max_prompt_bytes is None or config.parallel.kv_transport == "auto"):
        raise ValueError("this needs a resolved EngineConfig: pass it through "
                         "streamvlm.contract.config.resolve() first")


def tcp_host_port(address: str, name: str) -> tuple[str, int]:
    """Host and port of a "tcp://HOST:PORT" address; ValueError naming the setting ``name``."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not host or not port.isdigit():
        raise ValueError(f"{name} must look like 'tcp://HOST:PORT', got {address!r}")
    return host, int(port)
