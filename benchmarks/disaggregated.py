"""Prefill/decode disaggregation under a mixed load, against mixed replicas on the same devices.

Steady short chats (each: a random prompt of --chat-prompt-len tokens, --chat-output-len output
tokens, --chats at once, started again as they end) while bursts of long prompts arrive
(--burst-size prompts of --burst-prompt-len tokens every --burst-every seconds). Reported per
layout: the chats' inter-token latency p50 / p99 (gaps between token-bearing deltas, split
evenly over the tokens a delta carries), their output tokens/s, and for prefill/decode the KV
handoffs: bytes, seconds (first token to KV in the decode pool) and bandwidth, against a raw
torch.distributed send/recv of the same bytes between the two devices in the same run (NCCL on
GPUs, gloo on CPU).

On two GPUs (nvidia-h200-x2), Qwen3-8B shapes with random weights:
    python benchmarks/disaggregated.py --json results/disaggregated.json
A quick CPU check with a small checkpoint folder:
    python benchmarks/disaggregated.py --model PATH --device cpu --dtype float32 --duration 5 \\
        --chats 4 --burst-prompt-len 200 --max-model-len 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else 0.0


def layout_fields(layout: str) -> dict:
    """EngineConfig fields of a layout name: "2p6d" (2 prefill + 6 decode groups) or "8mixed"
    (8 mixed replicas), one device each, in order."""
    match = re.fullmatch(r"(\d+)p(\d+)d", layout)
    if match:
        prefill, decode = int(match[1]), int(match[2])
        return {"groups": [{"role": "prefill", "devices": [i]} for i in range(prefill)]
                + [{"role": "decode", "devices": [prefill + i]} for i in range(decode)]}
    match = re.fullmatch(r"(\d+)mixed", layout)
    if match:
        n = int(match[1])
        return {"num_replicas": n, "devices": list(range(n))}
    raise SystemExit(f"unknown layout {layout!r}: use e.g. 1p1d, 2p6d or 2mixed")


async def mixed_load(args: argparse.Namespace, folder: str, layout: str) -> dict:
    from streamvlm import AsyncEngine, EngineConfig, SamplingParams

    common = dict(model=folder, load_format="dummy" if not args.model else "auto", skip_tokenizer_init=True,
                  device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=False)
    config = EngineConfig(**layout_fields(layout), **common)
    rng = random.Random(0)
    vocab = min(10000, json.loads((Path(folder) / "config.json").read_text()).get("vocab_size", 10000))
    chat_params = SamplingParams(max_tokens=args.chat_output_len, ignore_eos=True, temperature=0)
    burst_params = SamplingParams(max_tokens=args.burst_output_len, ignore_eos=True, temperature=0)
    gaps: list[float] = []
    chat_tokens = 0
    stop_at = 0.0

    async def chat_loop(engine: AsyncEngine) -> None:
        nonlocal chat_tokens
        while time.monotonic() < stop_at:
            prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.chat_prompt_len)]}
            last = None
            async for delta in engine.stream(prompt, chat_params):
                now = time.monotonic()
                if delta.token_ids:
                    if last is not None:
                        gaps.extend([(now - last) / len(delta.token_ids)] * len(delta.token_ids))
                    last = now
                    chat_tokens += len(delta.token_ids)

    async def bursts(engine: AsyncEngine) -> int:
        sent = 0
        pending = []
        while time.monotonic() + args.burst_every < stop_at:
            await asyncio.sleep(args.burst_every)
            for _ in range(args.burst_size):
                prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.burst_prompt_len)]}
                pending.append(asyncio.ensure_future(engine.generate(prompt, burst_params)))
                sent += 1
        await asyncio.gather(*pending)
        return sent

    async with AsyncEngine(config) as engine:
        await engine.generate({"prompt_token_ids": list(range(64))}, SamplingParams(max_tokens=4))   # warm-up
        stop_at = time.monotonic() + args.duration
        start = time.monotonic()
        results = await asyncio.gather(bursts(engine), *(chat_loop(engine) for _ in range(args.chats)))
        elapsed = time.monotonic() - start
        stats = await engine.stats()
    row = {"layout": layout, "seconds": round(elapsed, 2), "bursts_sent": results[0],
           "chat_tokens_per_s": round(chat_tokens / elapsed, 1),
           "chat_itl_ms_p50": round(1000 * statistics.median(gaps), 2) if gaps else None,
           "chat_itl_ms_p99": round(1000 * percentile(gaps, 99), 2) if gaps else None}
    if "p" in layout:
        row.update(kv_transfers=stats.kv_transfers, kv_transfer_bytes=stats.kv_transfer_bytes,
                   kv_transfer_seconds=round(stats.kv_transfer_seconds, 4),
                   kv_bandwidth_gb_s=round(stats.kv_transfer_bytes / stats.kv_transfer_seconds / 1e9, 3)
                   if stats.kv_transfer_seconds else None)
    return row


def _raw_peer(rank: int, port: int, num_bytes: int, repeats: int, device: str, out) -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    where = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    buffer = torch.empty(num_bytes, dtype=torch.uint8, device=where)
    for i in range(repeats + 2):   # two warm-up rounds
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        if rank == 0:
            dist.send(buffer, dst=1)
        else:
            dist.recv(buffer, src=0)
    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        out.put(num_bytes * repeats / (time.perf_counter() - start))
    dist.destroy_process_group()


def raw_send_recv_bandwidth(num_bytes: int, device: str, repeats: int = 20) -> float:
    """Bytes per second of torch.distributed send/recv of num_bytes from device 0 to device 1."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    procs = [spawn.Process(target=_raw_peer, args=(rank, port, num_bytes, repeats, device, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    result = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return result


def add_mixed_load_args(parser: argparse.ArgumentParser, chats: int, burst_size: int) -> None:
    """The flags of the mixed load, shared with scaling.py."""
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--chats", type=int, default=chats)
    parser.add_argument("--chat-prompt-len", type=int, default=128)
    parser.add_argument("--chat-output-len", type=int, default=256)
    parser.add_argument("--burst-every", type=float, default=5.0)
    parser.add_argument("--burst-size", type=int, default=burst_size)
    parser.add_argument("--burst-prompt-len", type=int, default=8192)
    parser.add_argument("--burst-output-len", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=10240)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--model", help="a checkpoint folder instead of --shape (its own weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    add_mixed_load_args(parser, chats=32, burst_size=4)
    parser.add_argument("--layouts", default="1p1d,2mixed")
    parser.add_argument("--json")
    args = parser.parse_args()

    folder = args.model or shape_folder(args.shape)
    rows = [asyncio.run(mixed_load(args, folder, layout)) for layout in args.layouts.split(",")]
    print(f"{'layout':>8} {'chat tok/s':>11} {'ITL p50 ms':>11} {'ITL p99 ms':>11} {'bursts':>7}")
    for row in rows:
        print(f"{row['layout']:>8} {row['chat_tokens_per_s']:>11} {row['chat_itl_ms_p50']:>11} "
              f"{row['chat_itl_ms_p99']:>11} {row['bursts_sent']:>7}")
    result: dict = {"shape": args.model or args.shape, "device": args.device, "layouts": rows}
    split = next((r for r in rows if r["layout"] == "1p1d"), None)
    if split and split.get("kv_transfers"):
        mean_bytes = split["kv_transfer_bytes"] // split["kv_transfers"]
        raw = raw_send_recv_bandwidth(mean_bytes, args.device)
        result["raw_send_recv_gb_s"] = round(raw / 1e9, 3)
        result["kv_bandwidth_vs_raw"] = round(split["kv_bandwidth_gb_s"] * 1e9 / raw, 3) if split["kv_bandwidth_gb_s"] else None
        print(f"KV handoffs: {split['kv_transfers']}, {mean_bytes / 1e6:.1f} MB each, "
              f"{split['kv_bandwidth_gb_s']} GB/s (first token to KV in the decode pool); raw send/recv of "
              f"the same bytes: {raw / 1e9:.3f} GB/s ({result['kv_bandwidth_vs_raw']})")
    mixed = next((r for r in rows if r["layout"] == "2mixed"), None)
    if split and mixed and mixed["chat_itl_ms_p99"]:
        result["itl_p99_ratio"] = round(split["chat_itl_ms_p99"] / mixed["chat_itl_ms_p99"], 3)
        print(f"chat ITL p99, 1p1d / 2mixed: {result['itl_p99_ratio']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
