"""The KV cache of one rank: how many blocks fit, their tensors (bound to the model's attention
layers), and this rank's part of moving blocks in and out for a prefill/decode handoff."""

from __future__ import annotations

import logging

import torch

from streamvlm.contract.config import EngineConfig
from workers.distributed import broadcast_int, gather_to_rank0, scatter_from_rank0, tp_size
from workers.layers.attention_base import AttentionBackend, AttentionMetadata
from workers.rank_messages import KVShardPlan

logger = logging.getLogger(__name__)


class KVMemory:
    """``kv_cache`` is [num_layers, 2 (keys, values), num_blocks, block_size, num_kv_heads, head_dim];
    with skip_model_forward there is no cache, only enough block ids."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, uses_mrope: bool) -> None:
        self.config = config
        self.model = model
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.uses_mrope = uses_mrope
        if config.model.skip_model_forward:
            # No forward pass reads the cache: enough block ids that no request is preempted.
            blocks_per_seq = -(-max_model_len // self.block_size)
            self.num_blocks = config.cache.num_kv_blocks or config.scheduler.max_num_seqs * blocks_per_seq
        else:
            # Every rank of a tensor-parallel group holds the same block ids: rank 0 decides.
            self.num_blocks = broadcast_int(config.cache.num_kv_blocks or self._blocks_from_memory(max_model_len))
            self._allocate()

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
            budget = total * self.config.cache.gpu_memory_utilization - used - activations
            num_blocks = int(budget // per_block)
            logger.info("GPU memory: %.2f GiB total, %.2f GiB in use after loading, %.2f GiB peak activations "
                        "(warm-up of %d tokens), gpu_memory_utilization %.2f", total / 2**30, used / 2**30,
                        activations / 2**30, self._warmup_tokens(max_model_len),
                        self.config.cache.gpu_memory_utilization)
        else:
            # On CPU, no more than the configured budget, nor more than the batch can ever use.
            budget_blocks = int(self.config.cache.cpu_kv_cache_gib * 2**30 // per_block)
            blocks_per_seq = -(-max_model_len // self.block_size)
            num_blocks = min(budget_blocks, self.config.scheduler.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV-cache block")
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * per_block / 2**20)
        return num_blocks

    def _warmup_tokens(self, max_model_len: int) -> int:
        return max(1, min(self.config.scheduler.max_num_batched_tokens, max_model_len))

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
        self._allocate()
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
        rows = min(n, self.config.scheduler.max_num_seqs)
        torch.log_softmax(self.model.compute_logits(hidden[:rows]).float(), dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del self.kv_cache, hidden
        for attn in self.model.attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return peak

    def _allocate(self) -> None:
        args = self.model.args
        shape = (args.num_layers, 2, self.num_blocks, self.block_size,
                 self.model.shard.num_kv_heads, args.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers):
            attn.backend = self.backend
            attn.k_cache = self.kv_cache[i, 0]
            attn.v_cache = self.kv_cache[i, 1]

    def check_shards(self, num_blocks: int, shards: list[torch.Tensor]) -> None:
        """Shards from a prefill group fit this group: one per rank, each shaped as num_blocks of
        this pool's blocks (ValueError otherwise)."""
        if len(shards) != tp_size():
            raise ValueError(f"{len(shards)} KV shards for a group of tensor_parallel_size {tp_size()}: "
                             f"prefill and decode groups need equal tensor-parallel sizes")
        expected = (*self.kv_cache.shape[:2], num_blocks, *self.kv_cache.shape[3:])
        if any(tuple(shard.shape) != expected for shard in shards):
            raise ValueError(f"KV shards of shape {tuple(shards[0].shape)} do not fit this pool: "
                             f"expected {expected}")

    def run_plan(self, plan: KVShardPlan, shards: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
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
