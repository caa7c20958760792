"""Owns the model and the sampler, with its KV memory and encoder beside it; plans and runs one
scheduled step (rank 0), or follows rank 0's plan (the other ranks of a tensor-parallel group)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import random

import numpy as np
import torch

from streamvlm.contract.config import EngineConfig, check_resolved
from streamvlm.contract.model_source import ModelSource
from streamvlm.contract.protocol import PromptLogprobs
from workers.rank_messages import KVShardPlan, StepPlan
from workers.cuda_graphs import DecodeGraphs
from workers.device_settings import DeviceSettings
from workers.distributed import broadcast_tensor
from workers.layers.attention import get_attention_backend
from workers.layers.attention_base import AttentionMetadata
from workers.loader import load_model
from workers.encoder_runner import EncoderRunner
from workers.kernels.index_arrays import packed
from workers.kv_memory import KVMemory
from workers.multimodal import MultiModalEmbeds
from workers.prompt_logprobs import (PromptLogprobRequest, PromptLogprobTensors, compute_prompt_logprobs,
                                     prompt_logprob_span, split_by_sequence)
from workers.sampler import PendingSample, Sampler, SamplerOutput
from workers.scheduler import ScheduledChunk
from workers.sequence import PLACEHOLDER_TOKEN, Sequence


@dataclass
class PendingStep:
    seqs: list[Sequence]                  # the sequences that sample, in row order
    sample: PendingSample | None
    output: SamplerOutput | None          # already known (no forward pass)
    # Prompt logprobs of the step's prefill chunks that asked for them, still on the device.
    prompt: tuple[PromptLogprobRequest, PromptLogprobTensors] | None = None
    # Launched with defer_sampling: the sampling rows' logits, waiting for sample().
    logits: torch.Tensor | None = None
    shares_sampled_tokens: bool = False


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, settings: DeviceSettings) -> None:
        """``config`` resolved by the engine core, ``settings`` by this worker group."""
        check_resolved(config)
        self.config = config
        self.settings = settings
        max_model_len: int = config.model.max_model_len
        self.device = settings.device
        self.dtype = settings.dtype
        self.block_size = config.cache.block_size
        torch.manual_seed(config.model.seed)
        self.model = load_model(source, config.model.load_format, max_model_len, self.device,
                                self.dtype, config.model.seed)
        self.backend = get_attention_backend(settings.attention_backend, self.device, max_model_len, self.dtype)
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))
        self.kv_memory = KVMemory(config, self.model, self.backend, self.device, self.dtype, max_model_len,
                                  self.uses_mrope)
        self.sampler = Sampler(self.device, config.model.seed)
        if not config.model.skip_model_forward:
            self.sampler.warm_up(self.model.args.vocab_size, self.dtype)
        self.supports_images = hasattr(self.model, "encode")
        self.encoder = EncoderRunner(self.model, config.cache.encoder_cache_tokens)
        # Set on rank 0 of a tensor-parallel group: sends each step's plan to the other ranks.
        self.publish_plan: Callable[[StepPlan], None] | None = None
        # Async scheduling with tensor parallelism (set by the worker): rank 0 broadcasts each step's sampled
        # tokens; the other ranks keep the last ones they received.
        self.shares_sampled_tokens = False
        self._shared_tokens: torch.Tensor | None = None
        self._rng = random.Random(config.model.seed)
        self.decode_graphs: DecodeGraphs | None = None
        if self._use_cuda_graphs():
            self.decode_graphs = DecodeGraphs(self.model, self.backend, self.device,
                                              config.model.max_cuda_graph_batch_size, max_model_len,
                                              self.block_size, self.uses_mrope)
            self.decode_graphs.capture()
            use_encoder_graphs = getattr(self.model, "use_encoder_graphs", None)
            if use_encoder_graphs is not None:
                use_encoder_graphs(config.scheduler.max_num_encoder_tokens)
        if self.device.type == "cuda" and not config.model.skip_model_forward:
            warm_up_logits(self.model, config.scheduler.max_num_seqs, self.dtype, self.device)

    def _use_cuda_graphs(self) -> bool:
        return (self.device.type == "cuda" and not self.config.model.enforce_eager
                and not self.config.model.skip_model_forward
                and getattr(self.backend, "supports_cuda_graphs", False))

    def gather_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Rank 0: the blocks' keys and values of every rank of the group (one shard each)."""
        plan = KVShardPlan(op="gather", block_ids=block_ids)
        if self.publish_plan is not None:
            self.publish_plan(plan)
        return self.kv_memory.run_plan(plan)

    def scatter_kv(self, block_ids: list[int], shards: list[torch.Tensor]) -> None:
        """Rank 0: shard r (from rank r of the prefill group) into rank r's blocks."""
        self.kv_memory.check_shards(len(block_ids), shards)
        plan = KVShardPlan(op="scatter", block_ids=block_ids)
        if self.publish_plan is not None:
            self.publish_plan(plan)
        self.kv_memory.run_plan(plan, shards)

    def plan(self, chunks: list[ScheduledChunk]) -> StepPlan:
        """What every rank needs to run this step's forward pass."""
        return build_step_plan(chunks, self.block_size, self.uses_mrope)

    def _prepare(self, plan: StepPlan, previous_tokens: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        mrope = plan.mrope_positions
        input_ids, slot_mapping, block_tables, logits_rows, holes, sources, positions = packed(
            [plan.input_ids, plan.slot_array(), plan.table_array().reshape(-1), plan.logits_rows,
             plan.placeholder_rows, plan.placeholder_sources,
             plan.positions if mrope is None else np.asarray(mrope, dtype=np.int64).reshape(-1)],
            torch.int64, self.device)
        meta = AttentionMetadata(
            query_lens=plan.query_lens,
            seq_lens=plan.seq_lens,
            slot_mapping=slot_mapping,
            block_tables=block_tables.view(len(plan.query_lens), plan.block_table_width),
            block_size=self.block_size,
        )
        if mrope is not None:
            positions = positions.view(len(mrope), -1)
        if plan.placeholder_rows:
            input_ids[holes] = previous_tokens[sources]
        return input_ids, positions, meta, logits_rows

    def _mm_embeds(self, plan: StepPlan, embeds: torch.Tensor | None) -> MultiModalEmbeds | None:
        """This step's encoder rows; ranks other than 0 receive rank 0's over the group."""
        if not plan.mm_rows:
            return None
        if embeds is None:
            embeds = torch.empty(len(plan.mm_rows), self.model.embed_width, dtype=self.dtype,
                                 device=self.device)
        embeds = broadcast_tensor(embeds.to(self.device, self.dtype))
        rows = packed([plan.mm_rows], torch.int64, self.device)[0]
        return MultiModalEmbeds(rows, embeds)

    def _random_tokens(self, count: int) -> SamplerOutput:
        return SamplerOutput(self._rng.choices(range(self.model.args.vocab_size), k=count), [None] * count)

    def _forward(self, plan: StepPlan, embeds: torch.Tensor | None,
                 previous_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the step's tokens, and the rows to take logits of (None: every row)."""
        if plan.placeholder_rows and previous_tokens is None:
            raise RuntimeError("a step plan with placeholder tokens needs the previous step's sampled tokens")
        graph = self.decode_graphs.graph_for(plan) if self.decode_graphs is not None else None
        if graph is not None:
            hidden = self.decode_graphs.run(plan, graph, previous_tokens)
            if len(plan.logits_rows) == hidden.shape[0]:
                return hidden, None
            return hidden, packed([plan.logits_rows], torch.int64, self.device)[0]
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
            plan, embeds = self.plan(chunks), self.encoder.encoded_embeds(chunks)
        else:
            plan = chunks
        return self._step_logits(plan, embeds, previous_tokens, None)[0].float()

    def _step_logits(self, plan: StepPlan, embeds: torch.Tensor | None, previous_tokens: torch.Tensor | None,
                     prompt_request: PromptLogprobRequest | None
                     ) -> tuple[torch.Tensor, PromptLogprobTensors | None]:
        """The sampling rows' logits, and (rank 0, when the plan has prompt-logprob rows) the
        prompt logprobs; every rank computes the same logits, in the same order."""
        hidden, logits_rows = self._forward(plan, embeds, previous_tokens)
        logits = self.model.compute_logits(hidden if logits_rows is None else hidden[logits_rows])
        prompt = None
        if plan.prompt_logits_rows:
            prompt = compute_prompt_logprobs(self.model.compute_logits, hidden, plan.prompt_logits_rows,
                                             prompt_request)
        return logits, prompt

    @torch.inference_mode()
    def forward_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits (float32) of every token the chunks compute, in order (for tests and scoring).

        The chunks' K/V go into the cache as in a normal step; the caller owns their blocks.
        """
        hidden, _ = self._forward(self.plan(chunks), self.encoder.encoded_embeds(chunks))
        return self.model.compute_logits(hidden).float()

    def run(self, chunks: list[ScheduledChunk]) -> SamplerOutput:
        """One step; the chunks' items are already encoded (encode_pending)."""
        return self.finish(self.launch(chunks))

    def launch(self, chunks: list[ScheduledChunk], previous: PendingStep | None = None,
               defer_sampling: bool = False) -> PendingStep:
        """Queue one step's forward pass and sampling on the device and return without waiting for
        it, so that the caller's bookkeeping overlaps with the device's work. Placeholder tokens in
        the chunks (async scheduling) are the sampled tokens of ``previous``, still in flight.

        ``defer_sampling``: the forward pass only; sample() queues the sampling later, once the
        sequences hold the tokens sampling reads (penalties, bad words, grammars)."""
        samplers = [c.seq for c in chunks if c.samples]
        if self.config.model.skip_model_forward:
            return PendingStep(samplers, None, self._random_tokens(len(samplers)))
        plan = self.plan(chunks)
        plan.shares_sampled_tokens = self.shares_sampled_tokens and bool(plan.logits_rows)
        embeds = self.encoder.embeds(chunks)
        if self.publish_plan is not None:
            if plan.placeholder_rows and not self.shares_sampled_tokens:
                raise RuntimeError("placeholder tokens in a tensor-parallel step whose ranks do not share "
                                   "the sampled tokens")
            self.publish_plan(plan)   # the other ranks run the same forward pass with us
        previous_tokens = previous.sample.token_ids if previous is not None and previous.sample else None
        prompt_request = PromptLogprobRequest.take(chunks) if plan.prompt_logits_rows else None
        with torch.inference_mode():
            logits, prompt = self._step_logits(plan, embeds, previous_tokens, prompt_request)
        if prompt is not None:
            # Queued before the sampler records its ready event, which finish() waits for: with
            # async scheduling a plain .tolist() later would wait for the next step too.
            prompt = prompt.on_host()
        pending = PendingStep(samplers, None, None, (prompt_request, prompt) if prompt_request is not None else None,
                              logits, plan.shares_sampled_tokens)
        if not defer_sampling:
            self.sample(pending)
        return pending

    def sample(self, pending: PendingStep) -> None:
        """Queue the sampling of a launched step whose sampling waits (see launch)."""
        if pending.logits is None:
            return
        pending.sample = self.sampler.launch(pending.logits, pending.seqs)
        pending.logits = None
        if pending.shares_sampled_tokens:
            broadcast_tensor(pending.sample.token_ids)

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A rank other than 0: rank 0's step, and the tokens it samples when the next step needs them."""
        self._step_logits(plan, None, self._shared_tokens, None)
        if plan.shares_sampled_tokens:
            tokens = torch.empty(len(plan.logits_rows), dtype=torch.int64, device=self.device)
            self._shared_tokens = broadcast_tensor(tokens)

    def finish(self, pending: PendingStep) -> SamplerOutput:
        if pending.output is not None:
            return pending.output
        return self.sampler.finish(pending.sample, pending.seqs)

    @staticmethod
    def finish_prompt_logprobs(pending: PendingStep) -> list[tuple[Sequence, PromptLogprobs]]:
        """The step's prompt logprobs by sequence (after finish(), which waited for their copies)."""
        if pending.prompt is None:
            return []
        return split_by_sequence(*pending.prompt)


@torch.inference_mode()
def warm_up_logits(model: torch.nn.Module, max_rows: int, dtype: torch.dtype, device: torch.device) -> None:
    """The LM head once for every number of rows a step samples (1 to max_num_seqs). On CUDA the first product
    of a new shape loads its cuBLAS kernel (5-6 ms on an H200): without this, the first step to sample a new
    number of rows (a prefill step ending some prompts, a decode batch shrinking past a size) waited for it."""
    hidden = torch.zeros(max_rows, model.args.hidden_size, dtype=dtype, device=device)
    for rows in range(1, max_rows + 1):
        model.compute_logits(hidden[:rows])
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step_plan(chunks: list[ScheduledChunk], block_size: int, uses_mrope: bool) -> StepPlan:
    """What every rank needs to run one step's forward pass over these chunks."""
    input_ids: list[int] = []
    mrope: list[list[int]] | None = [[], [], []] if uses_mrope else None
    logits_rows: list[int] = []
    mm_rows: list[int] = []
    placeholder_rows: list[int] = []
    placeholder_sources: list[int] = []
    prompt_logits_rows: list[int] = []
    table_rows = [c.seq.block_table_array() for c in chunks]
    table_lens = np.fromiter(map(len, table_rows), dtype=np.int64, count=len(chunks))
    width = int(table_lens.max())
    tables = np.zeros((len(chunks), width), dtype=np.int32)
    # One scatter, not a row assignment per sequence: the rows are ragged.
    tables[np.arange(width) < table_lens[:, None]] = np.concatenate(table_rows)
    for chunk in chunks:
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
        row = len(input_ids)
        token_ids = seq.token_ids
        if end - start == 1:
            input_ids.append(token_ids[start])
        else:
            input_ids.extend(token_ids[start:end])
        if mrope is not None:
            _extend_mrope(mrope, seq, start, end)
        for item in seq.mm_items:
            lo, hi = max(start, item.offset), min(end, item.end)
            mm_rows.extend(range(row + lo - start, row + hi - start))
        position = seq.placeholder_position
        if start <= position < end and token_ids[position] == PLACEHOLDER_TOKEN:
            placeholder_rows.append(row + position - start)
            placeholder_sources.append(seq.placeholder_source)
        span = prompt_logprob_span(chunk)
        if span is not None:
            prompt_logits_rows.extend(range(row + span[0] - start, row + span[1] - start))
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
                    placeholder_sources=placeholder_sources, prompt_logits_rows=prompt_logits_rows)


def _extend_mrope(rows: list[list[int]], seq: Sequence, start: int, end: int) -> None:
    prompt_end = min(end, seq.num_prompt_tokens) if seq.mrope_positions is not None else start
    if start < prompt_end:
        part = seq.mrope_positions[:, start:prompt_end].tolist()
        for axis in range(3):
            rows[axis].extend(part[axis])
    rest = range(max(start, prompt_end) + seq.mrope_delta, end + seq.mrope_delta)
    for axis in range(3):
        rows[axis].extend(rest)
