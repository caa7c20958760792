"""Attention backends compared on the paged KV cache: microseconds per layer call of each
backend's attend() (the keys and values already in the cache) for decode batches, prefill
chunks over a cached prefix and mixed steps, on a real model's head shapes (default Qwen3-8B),
bfloat16, blocks of 16. Calls replay from a CUDA graph over enough layers' caches that a layer's
keys are not served from L2 by the previous call. (The flash_attn backend decodes with the
Triton kernel: its decode rows time the same kernel as triton's.) Beside each time: the keys and
values the case attends to, read per second, as a share of the HBM copy bandwidth measured in the
same run (for decode, how near the kernel streams the cache to the limit; prefill is bound by
compute, not by these bytes).

On the GPU machine:
    python benchmarks/attention.py --json results/attention.json
    python benchmarks/attention.py --backends triton,flash_attn --shape qwen3-0.6b
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import seconds_per_replay, write_json  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    query_lens: list[int]
    seq_lens: list[int]


def throughput_decode_batch(step: int) -> Case:
    """The decode batch of benchmarks/throughput.py's workload at an output step: every request with more
    output tokens left, at its prompt length plus the step (mixed contexts, unlike the uniform cases)."""
    from benchmarks.throughput import workload

    prompts, output_lens = workload(256, 100, 1024)
    seq_lens = [len(p) + step + 1 for p, n in zip(prompts, output_lens) if n > step]
    return Case(f"throughput workload step {step}: b{len(seq_lens)} ctx {min(seq_lens)}-{max(seq_lens)}",
                [1] * len(seq_lens), seq_lens)


def cases(throughput_steps: list[int]) -> list[Case]:
    return [
        Case("decode b1 ctx 512", [1], [512]),
        Case("decode b1 ctx 8192", [1], [8192]),
        Case("decode b64 ctx 1024", [1] * 64, [1024] * 64),
        Case("decode b256 ctx 600", [1] * 256, [600] * 256),
        Case("decode b256 ctx 300", [1] * 256, [300] * 256),
        Case("decode b128 ctx 1500", [1] * 128, [1500] * 128),
        Case("decode b32 ctx 1500", [1] * 32, [1500] * 32),
        Case("decode b16 ctx 700", [1] * 16, [700] * 16),
        *(throughput_decode_batch(step) for step in throughput_steps),
        Case("prefill 1 x 2048", [2048], [2048]),
        Case("prefill 4 x 512 over 512 cached", [512] * 4, [1024] * 4),
        Case("mixed 512-token chunk + 200 decodes ctx 600", [512] + [1] * 200, [900] + [600] * 200),
    ]


def kv_bytes(case: Case, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of keys and values (bfloat16) the case's queries attend to: what decode must read."""
    return sum(case.seq_lens) * num_kv_heads * head_dim * 2 * 2


def time_case(backend_name: str, case: Case, num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, repeats: int, max_model_len: int, longest_first: bool = True,
              decode_partition_size: int | None = None) -> float:
    """Microseconds per attend() call. ``decode_partition_size``: split decode contexts in partitions of this
    many tokens instead of the backend's own plan."""
    import torch

    from workers.layers.attention import get_attention_backend
    from workers.layers.attention_base import AttentionMetadata

    device = torch.device("cuda")
    dtype = torch.bfloat16
    max_len = max(case.seq_lens)
    # Planned as a server plans its CUDA graphs: partitions for max_model_len, a decode launch covering the
    # case's decode span.
    backend = get_attention_backend(backend_name, device, max(max_len, max_model_len), dtype)
    decode_backend = getattr(backend, "decode_backend", backend)
    if hasattr(decode_backend, "longest_first"):
        decode_backend.longest_first = longest_first
    if decode_partition_size is not None:
        decode_backend.decode_partition_size = decode_partition_size
    blocks_per_seq = [-(-s // block_size) for s in case.seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(case.seq_lens), max(blocks_per_seq), dtype=torch.int64)
    slots, used = [], 0
    for b, (n_blocks, seq_len, query_len) in enumerate(zip(blocks_per_seq, case.seq_lens, case.query_lens)):
        tables[b, :n_blocks] = order[used:used + n_blocks]
        used += n_blocks
        for pos in range(seq_len - query_len, seq_len):
            slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
    cache_bytes = 2 * num_blocks * block_size * num_kv_heads * head_dim * dtype.itemsize
    layers = max(2, min(36, -(-(256 << 20) // cache_bytes)))
    caches = [torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
              for _ in range(layers)]
    q = torch.randn(sum(case.query_lens), num_heads, head_dim, device=device, dtype=dtype)
    meta = AttentionMetadata(query_lens=case.query_lens, seq_lens=case.seq_lens,
                             slot_mapping=torch.tensor(slots, device=device),
                             block_tables=tables.to(device), block_size=block_size)
    backend.prepare(meta)
    scale = head_dim ** -0.5

    def run_layers() -> None:   # the warm-up call compiles, and plans every head shape
        for cache in caches:
            backend.attend(q, cache[0], cache[1], meta, scale)

    return seconds_per_replay(run_layers, repeats) * 1e6 / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--backends", default="triton,flash_attn", help="comma-separated attention backends")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="decode launches are planned for this context, as a server's CUDA graphs are")
    parser.add_argument("--in-given-order", action="store_true",
                        help="decode programs start in the batch's order, not longest context first")
    parser.add_argument("--decode-partition-size", type=int,
                        help="decode contexts split in partitions of this many tokens (a multiple of the kernel's "
                             "key tile; at least max-model-len: no split) instead of the backend's plan")
    parser.add_argument("--throughput-steps", default="0,300,600,900",
                        help="output steps of benchmarks/throughput.py's workload whose decode batches are cases")
    parser.add_argument("--json")
    args = parser.parse_args()
    from benchmarks.latency import hbm_bandwidth

    copy_bandwidth = hbm_bandwidth()
    print(f"HBM copy bandwidth (read + write): {copy_bandwidth / 1e12:.3f} TB/s; each backend's column: "
          f"us per call, and the case's keys and values read per second against it")
    cfg = SHAPES[args.shape].get("text_config") or SHAPES[args.shape]
    num_heads, num_kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    backends = args.backends.split(",")
    rows = []
    for case in cases([int(step) for step in args.throughput_steps.split(",") if step]):
        row = {"case": case.name}
        for name in backends:
            row[name] = time_case(name, case, num_heads, num_kv_heads, head_dim, args.block_size, args.repeats,
                                  args.max_model_len, longest_first=not args.in_given_order,
                                  decode_partition_size=args.decode_partition_size)
        row["kv_bytes"] = kv_bytes(case, num_kv_heads, head_dim)
        row["share_of_copy_bandwidth"] = {name: round(row["kv_bytes"] / (row[name] * 1e-6) / copy_bandwidth, 3)
                                          for name in backends}
        rows.append(row)
        print(f"{case.name:>46}  " + "  ".join(f"{name} {row[name]:9.1f} us {row['share_of_copy_bandwidth'][name]:6.1%}"
                                                for name in backends), flush=True)
    write_json(args.json, {"shape": args.shape, "block_size": args.block_size, "dtype": "bfloat16",
                           "longest_first": not args.in_given_order,
                           "decode_partition_size": args.decode_partition_size,
                           "max_model_len": args.max_model_len, "copy_bytes_per_s": copy_bandwidth,
                           "microseconds_per_call": rows})


if __name__ == "__main__":
    main()
