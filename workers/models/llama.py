"""The Llama decoder in plain PyTorch; Qwen2 and Qwen3 are the same network with other flags.

Checkpoint names follow transformers (model.layers.N.self_attn.q_proj.weight, ...); q/k/v and
gate/up projections are fused here into one matmul each and filled shard by shard on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size
from workers.layers.attention_base import AttentionBackend, AttentionMetadata
from workers.layers.fused_ops import fused_kernels
from workers.layers.linear import GatedLinear, Linear, PartialSums, linear, linear_for_norm
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding, rope_parameters_from_config
from workers.multimodal import MultiModalEmbeds

# Fused parameter -> the checkpoint projections it holds, in order.
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                  "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class DecoderArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, qkv_bias: bool | None = None,
                       o_bias: bool | None = None, qk_norm: bool = False) -> DecoderArgs:
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
        num_heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_parameters=rope_parameters_from_config(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_bias=attention_bias if o_bias is None else o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
        )


@dataclass(frozen=True)
class ShardPlan:
    """This rank's share of a tensor-parallel decoder: heads, KV heads (replicated when there
    are fewer than ranks), MLP columns and vocabulary rows."""

    num_heads: int
    num_kv_heads: int
    first_kv_head: int
    intermediate_size: int
    vocab_shard: int

    @classmethod
    def for_rank(cls, args: DecoderArgs, rank: int, size: int) -> ShardPlan:
        if args.num_heads % size or args.intermediate_size % size:
            raise ValueError(f"tensor_parallel_size={size} must divide num_attention_heads="
                             f"{args.num_heads} and intermediate_size={args.intermediate_size}")
        if args.num_kv_heads >= size:
            if args.num_kv_heads % size:
                raise ValueError(f"tensor_parallel_size={size} must divide "
                                 f"num_key_value_heads={args.num_kv_heads}")
            kv, first_kv = args.num_kv_heads // size, rank * (args.num_kv_heads // size)
        else:
            if size % args.num_kv_heads:
                raise ValueError(f"num_key_value_heads={args.num_kv_heads} must divide "
                                 f"tensor_parallel_size={size}")
            kv, first_kv = 1, rank * args.num_kv_heads // size
        return cls(args.num_heads // size, kv, first_kv, args.intermediate_size // size,
                   -(-args.vocab_size // size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns across ranks: partial sums are all-reduced
    before the (unsplit) bias is added."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor, for_norm: bool = False) -> torch.Tensor | PartialSums:
        """With ``for_norm`` (the result goes only to RMSNorm.add_and_norm), it may come as partial sums for
        the norm to add."""
        if tp_size() == 1:
            if for_norm and self.bias is None:
                return linear_for_norm(x, self.weight)
            return linear(x, self.weight, self.bias)
        y = all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds vocab_shard rows; tokens of other shards contribute zeros to the sum."""

    def __init__(self, vocab_shard: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_shard, hidden_size))
        self.start = tp_rank() * vocab_shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside[:, None], 0))


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs, shard: ShardPlan, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shard.num_heads, shard.num_kv_heads, args.head_dim)
        self.q_size = self.num_heads * args.head_dim
        self.kv_size = self.num_kv_heads * args.head_dim
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=args.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rotary = rotary
        self.scale = args.head_dim ** -0.5
        # Set by the model runner once the KV pool exists.
        self.backend: AttentionBackend | None = None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor | PartialSums:
        """The output projection's result, for the post-attention norm (it may be partial sums)."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        kernels = fused_kernels(x)
        if kernels is not None and getattr(self.rotary, "fusable", False):
            # One kernel rotates q and k and writes k and v into the cache; the backend only attends.
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
            q = kernels.qk_norm_rope_store(q, k, v, positions, self.rotary.cos_cache, self.rotary.sin_cache,
                                           self.k_cache, self.v_cache, meta.slot_mapping, *norms,
                                           axis=getattr(self.rotary, "axis", None))
            out = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale)
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
            if self.backend.name == "torch":
                v = v.contiguous()   # the Triton backend reads strided values
            out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.reshape(n, self.q_size), for_norm=True)


class MLP(nn.Module):
    def __init__(self, args: DecoderArgs, shard: ShardPlan) -> None:
        super().__init__()
        self.intermediate_size = shard.intermediate_size
        self.gate_up_proj = GatedLinear(args.hidden_size, 2 * shard.intermediate_size, bias=args.mlp_bias)
        self.down_proj = RowParallelLinear(shard.intermediate_size, args.hidden_size,
                                           bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, for_norm: bool = False) -> torch.Tensor | PartialSums:
        return self.down_proj(self.gate_up_proj(x), for_norm=for_norm)


class DecoderLayer(nn.Module):
    def __init__(self, args: DecoderArgs, shard: ShardPlan, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, shard, rotary)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, shard)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | PartialSums, residual: torch.Tensor | None,
                meta: AttentionMetadata, for_norm: bool = True) -> tuple[torch.Tensor | PartialSums, torch.Tensor]:
        """(MLP output, residual stream before it). The hidden state is their sum, which the next
        norm forms in its fused add (x is the whole hidden state when residual is None): the
        residual add costs no kernel of its own. With ``for_norm`` the MLP output may be partial sums
        (the next norm adds them); a caller that reads it otherwise passes False."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        attended = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(h, for_norm), residual


class DecoderModel(nn.Module):
    def __init__(self, args: DecoderArgs, shard: ShardPlan, max_model_len: int) -> None:
        super().__init__()
        rotary = RotaryEmbedding(args.head_dim, args.rope_parameters,
                                 args.max_position_embeddings, max_model_len)
        self.embed_tokens = VocabParallelEmbedding(shard.vocab_shard, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, shard, rotary)
                                    for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config: dict[str, Any], max_model_len: int) -> None:
        super().__init__()
        self.args = self.make_args(hf_config)
        self.shard = ShardPlan.for_rank(self.args, tp_rank(), tp_size())
        self.model = DecoderModel(self.args, self.shard, max_model_len)
        if not self.args.tie_word_embeddings:
            self.lm_head = nn.Linear(self.args.hidden_size, self.shard.vocab_shard, bias=False)

    @staticmethod
    def make_args(hf_config: dict[str, Any]) -> DecoderArgs:
        return DecoderArgs.from_hf_config(hf_config)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm: MultiModalEmbeds | None = None) -> torch.Tensor:
        """``mm``: encoder rows that replace the embeddings of those tokens (vision-language
        models built on this decoder)."""
        x = self.model.embed_tokens(input_ids)
        if mm is not None:
            x = x.index_copy(0, mm.rows, mm.embeds.to(x.dtype))
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.model.norm(x) if residual is None else self.model.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = (self.model.embed_tokens.weight if self.args.tie_word_embeddings
                  else self.lm_head.weight)
        logits = all_gather_last_dim(linear(hidden, weight))
        return logits[..., :self.args.vocab_size]   # the model's dtype: the sampler reads it as it is

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in; ValueError on an unknown, mis-shaped or missing tensor."""
        params = dict(self.named_parameters())
        expected = set(self.checkpoint_names())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.args.tie_word_embeddings):
                continue
            if name not in expected:
                raise ValueError(f"unexpected tensor {name!r} in checkpoint")
            dest = self._locate(name, params)
            tensor = self._rank_part(name, tensor)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")

    def checkpoint_names(self) -> list[str]:
        names = []
        for name, _ in self.named_parameters():
            for packed, parts in PACKED_MODULES.items():
                if f".{packed}." in name:
                    names.extend(name.replace(packed, part) for part in parts)
                    break
            else:
                names.append(name)
        return names

    def _locate(self, name: str, params: dict[str, nn.Parameter]) -> torch.Tensor:
        """Where a checkpoint tensor goes: its parameter, or its rows of a fused one."""
        for packed, parts in PACKED_MODULES.items():
            for index, part in enumerate(parts):
                if f".{part}." in name:
                    param = params[name.replace(part, packed)]
                    offset, rows = self._shard_rows(packed, index)
                    return param.data[offset:offset + rows]
        return params[name].data

    def _shard_rows(self, packed: str, index: int) -> tuple[int, int]:
        """First row and row count of shard index in a fused parameter."""
        s, d = self.shard, self.args.head_dim
        if packed == "qkv_proj":
            q, kv = s.num_heads * d, s.num_kv_heads * d
            return ((0, q), (q, kv), (q + kv, kv))[index]
        return index * s.intermediate_size, s.intermediate_size

    def _rank_part(self, name: str, tensor: Any) -> torch.Tensor:
        """This rank's part of a checkpoint tensor. Safetensors slices are read lazily, so a
        rank reads only its own rows or columns."""
        if tp_size() == 1:
            return tensor   # whole tensors: the loaders hand out slices only under TP
        rank, s, d = tp_rank(), self.shard, self.args.head_dim
        dim, start, length = 0, 0, None
        if ".q_proj." in name:
            start, length = rank * s.num_heads * d, s.num_heads * d
        elif ".k_proj." in name or ".v_proj." in name:
            start, length = s.first_kv_head * d, s.num_kv_heads * d
        elif ".o_proj.weight" in name:
            dim, start, length = 1, rank * s.num_heads * d, s.num_heads * d
        elif ".gate_proj." in name or ".up_proj." in name:
            start, length = rank * s.intermediate_size, s.intermediate_size
        elif ".down_proj.weight" in name:
            dim, start, length = 1, rank * s.intermediate_size, s.intermediate_size
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            start = rank * s.vocab_shard
            part = tensor[start:start + s.vocab_shard]
            part = part if isinstance(part, torch.Tensor) else torch.as_tensor(part)
            if part.shape[0] < s.vocab_shard:   # the last shard is padded with zero rows
                pad = part.new_zeros(s.vocab_shard - part.shape[0], *part.shape[1:])
                part = torch.cat([part, pad])
            return part
        if length is None:
            part = tensor[:]
        elif dim == 0:
            part = tensor[start:start + length]
        else:
            part = tensor[:, start:start + length]
        return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)
