"""Owns the model, its KV pool tensors and the sampler; runs one scheduled step."""

from __future__ import annotations

import logging
from collections.abc import Callable
import random

import torch

from streamvlm.config import EngineConfig
from streamvlm.model_source import ModelSource
from streamvlm.protocol import StepPlan
from workers.distributed import broadcast_int
from workers.layers.attention import AttentionMetadata, get_attention_backend
from workers.loader import load_model
from workers.sampler import Sampler, SamplerOutput
from workers.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

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
        self.backend = get_attention_backend(config.attention_backend, self.device)
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
        # Set on rank 0 of a tensor-parallel group: sends each step's plan to the other ranks.
        self.publish_plan: Callable[[StepPlan], None] | None = None
        self._rng = random.Random(config.seed)

    def _kv_bytes_per_block(self) -> int:
        args = self.model.args
        per_token = (2 * args.num_layers * self.model.shard.num_kv_heads * args.head_dim
                     * self.dtype.itemsize)
        return per_token * self.block_size

    def _blocks_from_memory(self, max_model_len: int) -> int:
        per_block = self._kv_bytes_per_block()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used
            num_blocks = int(budget // per_block)
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

    def _allocate_kv_cache(self) -> None:
        args = self.model.args
        shape = (args.num_layers, 2, self.num_blocks, self.block_size,
                 self.model.shard.num_kv_heads, args.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers):
            attn.backend = self.backend
            attn.k_cache = self.kv_cache[i, 0]
            attn.v_cache = self.kv_cache[i, 1]

    def plan(self, chunks: list[ScheduledChunk]) -> StepPlan:
        """What every rank needs to run this step's forward pass."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        bs = self.block_size
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if chunk.samples:
                logits_rows.append(len(input_ids) - 1)
        max_blocks = max(len(c.seq.block_table) for c in chunks)
        tables = [c.seq.block_table + [0] * (max_blocks - len(c.seq.block_table)) for c in chunks]
        return StepPlan(input_ids, positions, slots, tables,
                        [c.num_tokens for c in chunks],
                        [c.start + c.num_tokens for c in chunks], logits_rows)

    def _prepare(self, chunks: list[ScheduledChunk] | StepPlan
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        plan = chunks if isinstance(chunks, StepPlan) else self.plan(chunks)

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            query_lens=plan.query_lens,
            seq_lens=plan.seq_lens,
            slot_mapping=tensor(plan.slot_mapping),
            block_tables=tensor(plan.block_tables),
            block_size=self.block_size,
        )
        return tensor(plan.input_ids), tensor(plan.positions), meta, tensor(plan.logits_rows)

    def _random_tokens(self, chunks: list[ScheduledChunk]) -> SamplerOutput:
        vocab = self.model.args.vocab_size
        count = sum(c.samples for c in chunks)
        return SamplerOutput([self._rng.randrange(vocab) for _ in range(count)], [None] * count)

    @torch.inference_mode()
    def forward_logits(self, chunks: list[ScheduledChunk] | StepPlan) -> torch.Tensor:
        """Logits (float32) of the last token of every chunk that completes its sequence."""
        input_ids, positions, meta, logits_rows = self._prepare(chunks)
        self.backend.prepare(meta)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[logits_rows])

    @torch.inference_mode()
    def forward_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits (float32) of every token the chunks compute, in order (for tests and scoring).

        The chunks' K/V go into the cache as in a normal step; the caller owns their blocks.
        """
        input_ids, positions, meta, _ = self._prepare(chunks)
        self.backend.prepare(meta)
        return self.model.compute_logits(self.model(input_ids, positions, meta))

    def run(self, chunks: list[ScheduledChunk]) -> SamplerOutput:
        if self.config.skip_model_forward:
            return self._random_tokens(chunks)
        plan = self.plan(chunks)
        if self.publish_plan is not None:
            self.publish_plan(plan)   # the other ranks run the same forward pass with us
        logits = self.forward_logits(plan)
        return self.sampler(logits, [c.seq for c in chunks if c.samples])
