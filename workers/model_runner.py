"""Owns the model, its KV pool tensors and the sampler; runs one scheduled step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
import random

import numpy as np
import torch

from streamvlm.contract.config import EngineConfig
from streamvlm.contract.model_source import ModelSource
from workers.rank_messages import KVShardPlan, StepPlan
from workers.cuda_graphs import DecodeGraphs
from workers.distributed import (broadcast_int, broadcast_tensor, gather_to_rank0, scatter_from_rank0,
                                 tp_size)
from workers.layers.attention import get_attention_backend
from workers.layers.attention_base import AttentionMetadata
from workers.loader import load_model
from workers.multimodal import EncoderCache, MultiModalEmbeds, MultiModalInput
from workers.sampler import PendingSample, Sampler, SamplerOutput
from workers.scheduler import ScheduledChunk
from workers.sequence import PLACEHOLDER_TOKEN, Sequence

logger = logging.getLogger(__name__)

@dataclass
class PendingStep:
    seqs: list[Sequence]                  # the sequences that sample, in row order
    sample: PendingSample | None
    output: SamplerOutput | None          # already known (no forward pass)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, hf_config: dict, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    declared = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return torch.float16 if declared == "float16" else torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, source.hf_config, self.device)
        self.block_size = config.block_size
        torch.manual_seed(config.seed)
        self.model = load_model(source, config.load_format, max_model_len, self.device,
                                self.dtype, config.seed)
        self.backend = get_attention_backend(config.attention_backend, self.device, max_model_len, self.dtype)
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))
        if config.skip_model_forward:
            # No forward pass reads the cache: enough block ids that no request is preempted.
            blocks_per_seq = -(-max_model_len // self.block_size)
            self.num_blocks = config.num_kv_blocks or config.max_num_seqs * blocks_per_seq
        else:
            # Every rank of a tensor-parallel group holds the same block ids: rank 0 decides.
            self.num_blocks = broadcast_int(
                config.num_kv_blocks or self._blocks_from_memory(max_model_len))
            self._allocate_kv_cache()
        self.sampler = Sampler(self.device, config.seed)
        self.supports_images = hasattr(self.model, "encode")
        self.encoder_cache = EncoderCache(config.encoder_cache_tokens)
        self.num_encoded_items = 0
        # Set on rank 0 of a tensor-parallel group: sends each step's plan to the other ranks.
        self.publish_plan: Callable[[StepPlan], None] | None = None
        # Async scheduling with tensor parallelism (set by the worker): rank 0 broadcasts each step's sampled
        # tokens; the other ranks keep the last ones they received.
        self.shares_sampled_tokens = False
        self._shared_tokens: torch.Tensor | None = None
        self._rng = random.Random(config.seed)
        self.decode_graphs: DecodeGraphs | None = None
        if self._use_cuda_graphs():
            max_batch = config.max_cuda_graph_batch_size or min(config.max_num_seqs, 512)
            self.decode_graphs = DecodeGraphs(self.model, self.backend, self.device, max_batch, max_model_len,
                                              self.block_size, self.uses_mrope)
            self.decode_graphs.capture()

    def _use_cuda_graphs(self) -> bool:
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and not self.config.skip_model_forward
                and getattr(self.backend, "supports_cuda_graphs", False))

    def _kv_bytes_per_block(self) -> int:
        args = self.model.args
        per_token = (2 * args.num_layers * self.model.shard.num_kv_heads * args.head_dim
                     * self.dtype.itemsize)
        return per_token * self.block_size

    def _blocks_from_memory(self, max_model_len: int) -> int:
        per_block = self._kv_bytes_per_block()
        if self.device.type == "cuda":
            activations = self._peak_activation_bytes(max_model_len)
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used - activations
            num_blocks = int(budget // per_block)
            logger.info("GPU memory: %.2f GiB total, %.2f GiB in use after loading, %.2f GiB peak activations "
                        "(warm-up of %d tokens), gpu_memory_utilization %.2f", total / 2**30, used / 2**30,
                        activations / 2**30, self._warmup_tokens(max_model_len),
                        self.config.gpu_memory_utilization)
        else:
            # On CPU, no more than the configured budget, nor more than the batch can ever use.
            budget_blocks = int(self.config.cpu_kv_cache_gib * 2**30 // per_block)
            blocks_per_seq = -(-max_model_len // self.block_size)
            num_blocks = min(budget_blocks, self.config.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV-cache block")
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * per_block / 2**20)
        return num_blocks

    def _warmup_tokens(self, max_model_len: int) -> int:
        return max(1, min(self.config.max_num_batched_tokens, max_model_len))

    @torch.inference_mode()
    def _peak_activation_bytes(self, max_model_len: int) -> int:
        """Peak memory of a forward pass over a full step's token budget (a scratch KV cache that is freed
        again), beyond what is allocated now. It also compiles the prefill kernels before serving."""
        n = self._warmup_tokens(max_model_len)
        bs = self.block_size
        # A long prompt and (n > 1) a one-token query beside it: both kinds of prefill tiles compile now.
        query_lens = [n - 1, 1] if n > 1 else [n]
        long_blocks = -(-query_lens[0] // bs)
        blocks = long_blocks + (len(query_lens) - 1)
        self.num_blocks = blocks
        self._allocate_kv_cache()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        tables = torch.zeros(len(query_lens), long_blocks, dtype=torch.int64)
        tables[0] = torch.arange(long_blocks)
        slots = torch.arange(query_lens[0])
        if len(query_lens) > 1:
            tables[1, 0] = long_blocks
            slots = torch.cat([slots, torch.tensor([long_blocks * bs])])
        meta = AttentionMetadata(query_lens=query_lens, seq_lens=list(query_lens),
                                 slot_mapping=slots.to(self.device), block_tables=tables.to(self.device),
                                 block_size=bs)
        self.backend.prepare(meta)
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(q) for q in query_lens]).to(self.device)
        if self.uses_mrope:
            positions = positions.expand(3, n)
        hidden = self.model(ids, positions, meta)
        rows = min(n, self.config.max_num_seqs)
        torch.log_softmax(self.model.compute_logits(hidden[:rows]), dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del self.kv_cache, hidden
        for attn in self.model.attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_cache(self) -> None:
        args = self.model.args
        shape = (args.num_layers, 2, self.num_blocks, self.block_size,
                 self.model.shard.num_kv_heads, args.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers):
            attn.backend = self.backend
            attn.k_cache = self.kv_cache[i, 0]
            attn.v_cache = self.kv_cache[i, 1]

    def gather_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Rank 0: the blocks' keys and values of every rank of the group (one shard each)."""
        if self.publish_plan is not None:
            self.publish_plan(KVShardPlan(op="gather", block_ids=block_ids))
        return self.run_kv_plan(KVShardPlan(op="gather", block_ids=block_ids))

    def scatter_kv(self, block_ids: list[int], shards: list[torch.Tensor]) -> None:
        """Rank 0: shard r (from rank r of the prefill group) into rank r's blocks."""
        if len(shards) != tp_size():
            raise ValueError(f"{len(shards)} KV shards for a group of tensor_parallel_size {tp_size()}: "
                             f"prefill and decode groups need equal tensor-parallel sizes")
        expected = (*self.kv_cache.shape[:2], len(block_ids), *self.kv_cache.shape[3:])
        if any(tuple(shard.shape) != expected for shard in shards):
            raise ValueError(f"KV shards of shape {tuple(shards[0].shape)} do not fit this pool: "
                             f"expected {expected}")
        if self.publish_plan is not None:
            self.publish_plan(KVShardPlan(op="scatter", block_ids=block_ids))
        self.run_kv_plan(KVShardPlan(op="scatter", block_ids=block_ids), shards)

    def run_kv_plan(self, plan: KVShardPlan, shards: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every rank's part of a gather or scatter of KV blocks (followers call it for rank 0's plans)."""
        index = torch.tensor(plan.block_ids, dtype=torch.int64).to(self.device)
        if plan.op == "gather":
            return gather_to_rank0(self.kv_cache.index_select(2, index))
        mine = torch.empty((*self.kv_cache.shape[:2], len(plan.block_ids), *self.kv_cache.shape[3:]),
                           dtype=self.dtype, device=self.device)
        if shards is not None:
            shards = [shard.to(self.device, self.dtype) for shard in shards]
        self.kv_cache.index_copy_(2, index, scatter_from_rank0(shards, mine))
        return []

    def plan(self, chunks: list[ScheduledChunk]) -> StepPlan:
        """What every rank needs to run this step's forward pass."""
        return build_step_plan(chunks, self.block_size, self.uses_mrope)

    def encode_pending(self, chunks: list[ScheduledChunk]) -> dict[Sequence, str]:
        """Encode the items this step's chunks reach that neither their sequence nor the
        encoder cache holds, all in one call. A sequence keeps its items' outputs until their
        placeholders are all computed, so chunked prefill slices one encoding.

        Returns the sequences whose items could not be encoded, with the reason; the batch is
        retried item by item first so one bad image fails only its own request."""
        pending: dict[str, tuple[MultiModalInput, list[Sequence]]] = {}
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            for item in seq.mm_items:
                if item.offset >= end or item.end <= start or item.hash in seq.encoder_outputs:
                    continue
                if item.hash in pending:
                    pending[item.hash][1].append(seq)
                    continue
                cached = self.encoder_cache.get(item.hash)
                if cached is not None:
                    seq.encoder_outputs[item.hash] = cached
                else:
                    pending[item.hash] = (item, [seq])
        if not pending:
            return {}
        entries = list(pending.values())
        failed: dict[Sequence, str] = {}
        try:
            outputs: list[torch.Tensor | str] = list(self._encode([item for item, _ in entries]))
        except Exception:  # noqa: BLE001 - retried item by item to find the bad one
            outputs = []
            for item, _ in entries:
                try:
                    outputs.extend(self._encode([item]))
                except Exception as exc:  # noqa: BLE001 - fails only this item's requests
                    outputs.append(f"cannot encode image: {exc}")
        for (item, seqs), output in zip(entries, outputs):
            if isinstance(output, str):
                failed.update((seq, output) for seq in seqs)
                continue
            self.encoder_cache.put(item.hash, output)
            for seq in seqs:
                seq.encoder_outputs[item.hash] = output
        return failed

    @torch.inference_mode()
    def _encode(self, items: list[MultiModalInput]) -> list[torch.Tensor]:
        outputs = self.model.encode(items)
        self.num_encoded_items += len(items)
        for item, output in zip(items, outputs):
            if output.shape != (item.num_tokens, self.model.embed_width):
                raise ValueError(f"the encoder gave shape {tuple(output.shape)} for an item of "
                                 f"{item.num_tokens} placeholder tokens")
        return outputs

    @staticmethod
    def encoder_embeds(chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """Encoder output for every placeholder token the chunks compute, in step order (after
        encode_pending)."""
        parts: list[torch.Tensor] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            for item in seq.mm_items:
                lo, hi = max(start, item.offset), min(end, item.end)
                if lo < hi:
                    parts.append(seq.encoder_outputs[item.hash][lo - item.offset:hi - item.offset])
        return torch.cat(parts) if parts else None

    def _encoded_embeds(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        failed = self.encode_pending(chunks)
        if failed:
            raise ValueError(next(iter(failed.values())))
        return self.encoder_embeds(chunks)

    def _prepare(self, plan: StepPlan, previous_tokens: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:

        def tensor(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            query_lens=plan.query_lens,
            seq_lens=plan.seq_lens,
            slot_mapping=tensor(plan.slot_array()),
            block_tables=tensor(plan.table_array()),
            block_size=self.block_size,
        )
        positions = tensor(plan.mrope_positions if plan.mrope_positions is not None
                           else plan.positions)
        input_ids = tensor(plan.input_ids)
        if plan.placeholder_rows:
            input_ids[tensor(plan.placeholder_rows)] = previous_tokens[tensor(plan.placeholder_sources)]
        return input_ids, positions, meta, tensor(plan.logits_rows)

    def _mm_embeds(self, plan: StepPlan, embeds: torch.Tensor | None) -> MultiModalEmbeds | None:
        """This step's encoder rows; ranks other than 0 receive rank 0's over the group."""
        if not plan.mm_rows:
            return None
        if embeds is None:
            embeds = torch.empty(len(plan.mm_rows), self.model.embed_width, dtype=self.dtype,
                                 device=self.device)
        embeds = broadcast_tensor(embeds.to(self.device, self.dtype))
        rows = torch.tensor(plan.mm_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return MultiModalEmbeds(rows, embeds)

    def _random_tokens(self, chunks: list[ScheduledChunk]) -> SamplerOutput:
        vocab = self.model.args.vocab_size
        count = sum(c.samples for c in chunks)
        return SamplerOutput([self._rng.randrange(vocab) for _ in range(count)], [None] * count)

    def _forward(self, plan: StepPlan, embeds: torch.Tensor | None,
                 previous_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the step's tokens, and the rows to take logits of (None: every row)."""
        if plan.placeholder_rows and previous_tokens is None:
            raise RuntimeError("a step plan with placeholder tokens needs the previous step's sampled tokens")
        if self.decode_graphs is not None and self.decode_graphs.can_run(plan):
            hidden = self.decode_graphs.run(plan, previous_tokens)
            if len(plan.logits_rows) == hidden.shape[0]:
                return hidden, None
            return hidden, torch.tensor(plan.logits_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        input_ids, positions, meta, logits_rows = self._prepare(plan, previous_tokens)
        self.backend.prepare(meta)
        return self.model(input_ids, positions, meta, self._mm_embeds(plan, embeds)), logits_rows

    @torch.inference_mode()
    def forward_logits(self, chunks: list[ScheduledChunk] | StepPlan, embeds: torch.Tensor | None = None,
                       previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) of the last token of every chunk that completes its sequence.

        Given chunks, this rank plans and encodes; given a plan (ranks other than 0), the
        encoder rows come from rank 0."""
        if not isinstance(chunks, StepPlan):
            plan, embeds = self.plan(chunks), self._encoded_embeds(chunks)
        else:
            plan = chunks
        hidden, logits_rows = self._forward(plan, embeds, previous_tokens)
        return self.model.compute_logits(hidden if logits_rows is None else hidden[logits_rows])

    @torch.inference_mode()
    def forward_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits (float32) of every token the chunks compute, in order (for tests and scoring).

        The chunks' K/V go into the cache as in a normal step; the caller owns their blocks.
        """
        hidden, _ = self._forward(self.plan(chunks), self._encoded_embeds(chunks))
        return self.model.compute_logits(hidden)

    def run(self, chunks: list[ScheduledChunk]) -> SamplerOutput:
        """One step; the chunks' items are already encoded (encode_pending)."""
        return self.finish(self.launch(chunks))

    def launch(self, chunks: list[ScheduledChunk], previous: PendingStep | None = None) -> PendingStep:
        """Queue one step's forward pass and sampling on the device and return without waiting for
        it, so that the caller's bookkeeping overlaps with the device's work. Placeholder tokens in
        the chunks (async scheduling) are the sampled tokens of ``previous``, still in flight."""
        samplers = [c.seq for c in chunks if c.samples]
        if self.config.skip_model_forward:
            return PendingStep(samplers, None, self._random_tokens(chunks))
        plan = self.plan(chunks)
        plan.shares_sampled_tokens = self.shares_sampled_tokens and bool(plan.logits_rows)
        embeds = self.encoder_embeds(chunks)
        if self.publish_plan is not None:
            if plan.placeholder_rows and not self.shares_sampled_tokens:
                raise RuntimeError("placeholder tokens in a tensor-parallel step whose ranks do not share "
                                   "the sampled tokens")
            self.publish_plan(plan)   # the other ranks run the same forward pass with us
        previous_tokens = previous.sample.token_ids if previous is not None and previous.sample else None
        logits = self.forward_logits(plan, embeds, previous_tokens)
        sample = self.sampler.launch(logits, samplers)
        if plan.shares_sampled_tokens:
            broadcast_tensor(sample.token_ids)
        return PendingStep(samplers, sample, None)

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A rank other than 0: rank 0's step, and the tokens it samples when the next step needs them."""
        self.forward_logits(plan, previous_tokens=self._shared_tokens)
        if plan.shares_sampled_tokens:
            tokens = torch.empty(len(plan.logits_rows), dtype=torch.int64, device=self.device)
            self._shared_tokens = broadcast_tensor(tokens)

    def finish(self, pending: PendingStep) -> SamplerOutput:
        if pending.output is not None:
            return pending.output
        return self.sampler.finish(pending.sample, pending.seqs)


def build_step_plan(chunks: list[ScheduledChunk], block_size: int, uses_mrope: bool) -> StepPlan:
    """What every rank needs to run one step's forward pass over these chunks."""
    input_ids: list[int] = []
    mrope: list[list[int]] | None = [[], [], []] if uses_mrope else None
    logits_rows: list[int] = []
    mm_rows: list[int] = []
    placeholder_rows: list[int] = []
    placeholder_sources: list[int] = []
    width = max(len(c.seq.block_table) for c in chunks)
    tables = np.zeros((len(chunks), width), dtype=np.int32)
    for i, chunk in enumerate(chunks):
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
        row = len(input_ids)
        token_ids = seq.token_ids
        if end - start == 1:
            input_ids.append(token_ids[start])
        else:
            input_ids.extend(token_ids[start:end])
        tables[i, :len(seq.block_table)] = seq.block_table_array()
        if mrope is not None:
            _extend_mrope(mrope, seq, start, end)
        for item in seq.mm_items:
            lo, hi = max(start, item.offset), min(end, item.end)
            mm_rows.extend(range(row + lo - start, row + hi - start))
        position = seq.placeholder_position
        if start <= position < end and token_ids[position] == PLACEHOLDER_TOKEN:
            placeholder_rows.append(row + position - start)
            placeholder_sources.append(seq.placeholder_source)
        if end == len(token_ids):   # the chunk samples
            logits_rows.append(len(input_ids) - 1)
    query_lens = [c.num_tokens for c in chunks]
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=len(chunks))
    if len(input_ids) == len(chunks):   # decode only: one token per sequence
        rows, positions = np.arange(len(chunks)), starts
    else:
        counts = np.asarray(query_lens)
        rows = np.repeat(np.arange(len(chunks)), counts)
        first_row = np.cumsum(counts) - counts
        positions = np.arange(len(input_ids)) - np.repeat(first_row - starts, counts)
    bs = block_size
    slots = tables[rows, positions // bs].astype(np.int64) * bs + positions % bs
    return StepPlan(input_ids, positions.tolist() if mrope is None else [], slots.tobytes(),
                    tables.tobytes(), width, query_lens,
                    [c.start + c.num_tokens for c in chunks], logits_rows,
                    mrope_positions=mrope, mm_rows=mm_rows, placeholder_rows=placeholder_rows,
                    placeholder_sources=placeholder_sources)


def _extend_mrope(rows: list[list[int]], seq: Sequence, start: int, end: int) -> None:
    prompt_end = min(end, seq.num_prompt_tokens) if seq.mrope_positions is not None else start
    if start < prompt_end:
        part = seq.mrope_positions[:, start:prompt_end].tolist()
        for axis in range(3):
            rows[axis].extend(part[axis])
    rest = range(max(start, prompt_end) + seq.mrope_delta, end + seq.mrope_delta)
    for axis in range(3):
        rows[axis].extend(rest)
