"""The engine core's own cost on CPU: tokens/s into concurrent engine.stream consumers.

Two modes on the embedded SmolLM2 (its real tokenizer, so detokenization is real work):
  model  the worker runs the model (what a CPU deployment delivers);
  noop   the worker samples random tokens without a forward pass (skip_model_forward), so the
         numbers show the ceiling of the engine core, ZeroMQ, msgspec and detokenization.
Engine-core CPU time per step is this process's CPU time (the worker is another process)
divided by the step outputs it received.

    python benchmarks/frontend.py                      # both modes, 1 / 64 / 256 streams
    python benchmarks/frontend.py --modes noop --json results/frontend.json

--ws measures the whole WebSocket path instead: the gateway (uvicorn, /v1/ws) in this process
with a noop worker process, and the clients (one chat per connection, ignore_eos) in a child
process, counting the tokens that reach them:

    python benchmarks/frontend.py --ws --streams 64 --noop-tokens 1024

Its columns: tokens/s and frames/s (chat.delta events) that reached the clients, tokens per
frame (the engine merges a chat's output while its consumer is behind), the median over chats
of the first delta's latency and of the longest gap between two deltas (how smoothly it
streamed), and the CPU seconds of the server process (engine core + gateway; the worker is
another process) and of the client process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402

async def run_case(engine, streams: int, max_tokens: int, prompt_len: int) -> dict:
    from streamvlm import SamplingParams

    rng = random.Random(streams)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(prompt_len)]}
               for _ in range(streams)]
    received = 0

    async def consume(prompt) -> None:
        nonlocal received
        async for delta in engine.stream(prompt, params):
            received += len(delta.token_ids)

    steps_before = (await engine.stats()).num_steps
    cpu_before, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(consume(p) for p in prompts))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    steps = (await engine.stats()).num_steps - steps_before
    return {"streams": streams, "tokens": received, "seconds": round(elapsed, 3),
            "tokens_per_s": round(received / elapsed), "steps": steps,
            "core_cpu_ms_per_step": round(1000 * cpu / max(steps, 1), 3)}


async def run_mode(mode: str, stream_counts: list[int], max_tokens: int,
                   prompt_len: int) -> list[dict]:
    from streamvlm import AsyncEngine, EngineConfig

    config = EngineConfig(device="cpu", max_model_len=2048, max_num_seqs=max(stream_counts),
                          max_num_batched_tokens=8192, skip_model_forward=mode == "noop")
    results = []
    async with AsyncEngine(config) as engine:
        await run_case(engine, 4, 8, prompt_len)   # warm-up
        for streams in stream_counts:
            row = await run_case(engine, streams, max_tokens, prompt_len)
            row["mode"] = mode
            results.append(row)
            print(f"{mode:>6} {row['streams']:>8} {row['tokens']:>9} {row['seconds']:>8.2f} "
                  f"{row['tokens_per_s']:>10} {row['steps']:>7} "
                  f"{row['core_cpu_ms_per_step']:>10.3f}", flush=True)
    return results


# ---- WebSocket mode: server in this process, clients in a child process ----------------------

def ws_clients(url: str, streams: int, max_tokens: int, prompt_len: int, compression: bool,
               conn) -> None:
    """Child process: ``streams`` connections, one chat each; sends back what arrived."""
    import msgspec
    from websockets.asyncio.client import connect

    from streamvlm.engine.loop import new_event_loop

    class Event(msgspec.Struct):
        type: str
        token_ids: list[int] = []
        finish_reason: str | None = None

    decode = msgspec.json.Decoder(Event).decode
    rng = random.Random(streams)

    async def one(i: int, ws) -> tuple[int, int, float, float]:
        prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "chat.create", "id": f"c{i}", "prompt": prompt,
                                  "params": {"temperature": 0, "max_tokens": max_tokens,
                                             "ignore_eos": True}}))
        tokens = frames = 0
        first = max_gap = 0.0
        last = sent
        while True:
            event = decode(await ws.recv())
            now = time.perf_counter()
            if event.type == "chat.delta":
                tokens += len(event.token_ids)
                frames += 1
                if frames == 1:
                    first = now - sent
                else:
                    max_gap = max(max_gap, now - last)
                last = now
            elif event.type == "chat.done":
                return tokens, frames, first, max_gap
            elif event.type == "error":
                raise RuntimeError(f"error event: {event}")

    async def main() -> dict:
        sockets = [await connect(url, compression="deflate" if compression else None,
                                 max_size=None, proxy=None) for _ in range(streams)]
        cpu_before, start = time.process_time(), time.perf_counter()
        counts = await asyncio.gather(*(one(i, ws) for i, ws in enumerate(sockets)))
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_before
        for ws in sockets:
            await ws.close()
        return {"tokens": sum(c[0] for c in counts), "frames": sum(c[1] for c in counts),
                "seconds": elapsed, "client_cpu_s": cpu,
                "first_delta_ms": sorted(1000 * c[2] for c in counts)[len(counts) // 2],
                "max_gap_ms": sorted(1000 * c[3] for c in counts)[len(counts) // 2]}

    loop = new_event_loop()
    try:
        conn.send(loop.run_until_complete(main()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"error": repr(exc)})
    finally:
        loop.close()


async def run_ws_case(url: str, streams: int, max_tokens: int, prompt_len: int,
                      compression: bool) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=ws_clients, args=(url, streams, max_tokens, prompt_len,
                                                compression, child), daemon=True)
    cpu_before = time.process_time()
    proc.start()
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, parent.recv)
    await loop.run_in_executor(None, proc.join)
    if "error" in result:
        raise RuntimeError(f"WebSocket clients failed: {result['error']}")
    server_cpu = time.process_time() - cpu_before   # includes the clients' connect phase
    return {"mode": "ws" + ("+deflate" if compression else ""), "streams": streams,
            "tokens": result["tokens"], "frames": result["frames"],
            "seconds": round(result["seconds"], 3),
            "tokens_per_s": round(result["tokens"] / result["seconds"]),
            "frames_per_s": round(result["frames"] / result["seconds"]),
            "tokens_per_frame": round(result["tokens"] / max(result["frames"], 1), 2),
            "first_delta_ms_p50": round(result["first_delta_ms"], 1),
            "max_gap_ms_p50": round(result["max_gap_ms"], 1),
            "client_cpu_s": round(result["client_cpu_s"], 2),
            "server_cpu_s": round(server_cpu, 2)}


async def run_ws(stream_counts: list[int], max_tokens: int, prompt_len: int,
                 compression: bool) -> list[dict]:
    import socket

    import uvicorn

    from streamvlm import AsyncEngine, EngineConfig
    from streamvlm.gateway.app import build_app
    from streamvlm.gateway.settings import GatewaySettings

    config = EngineConfig(device="cpu", max_model_len=2048, max_num_seqs=max(stream_counts),
                          max_num_batched_tokens=8192, skip_model_forward=True,
                          worker_backend="process")
    app = build_app(AsyncEngine(config), GatewaySettings())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           ws="websockets-sansio", lifespan="on",
                                           log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.05)
    url = f"ws://127.0.0.1:{port}/v1/ws"
    results = []
    try:
        await run_ws_case(url, 4, 8, prompt_len, compression)   # warm-up
        for streams in stream_counts:
            row = await run_ws_case(url, streams, max_tokens, prompt_len, compression)
            results.append(row)
            print(f"{row['mode']:>10} {row['streams']:>8} {row['tokens']:>9} "
                  f"{row['seconds']:>8.2f} {row['tokens_per_s']:>10} {row['frames_per_s']:>9} "
                  f"{row['tokens_per_frame']:>8} {row['first_delta_ms_p50']:>9} "
                  f"{row['max_gap_ms_p50']:>9} {row['server_cpu_s']:>7} "
                  f"{row['client_cpu_s']:>7}", flush=True)
    finally:
        server.should_exit = True
        await serving
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="model,noop")
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--noop-tokens", type=int, default=1024, help="output tokens per stream")
    parser.add_argument("--model-tokens", type=int, default=32, help="output tokens per stream")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--ws", action="store_true",
                        help="through the WebSocket gateway (noop worker, clients in a child "
                             "process) instead of engine.stream")
    parser.add_argument("--deflate", action="store_true",
                        help="--ws: negotiate permessage-deflate, as browsers do")
    args = parser.parse_args()

    from streamvlm.engine.loop import new_event_loop

    if args.ws:
        print(f"{'mode':>10} {'streams':>8} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} "
              f"{'frames/s':>9} {'tok/frm':>8} {'1st ms':>9} {'gap ms':>9} {'srv cpu':>7} "
              f"{'cli cpu':>7}")
        loop = new_event_loop()
        rows = loop.run_until_complete(run_ws([int(n) for n in args.streams.split(",")],
                                              args.noop_tokens, args.prompt_len, args.deflate))
        loop.close()
        write_json(args.json, rows)
        return

    stream_counts = [int(n) for n in args.streams.split(",")]
    print(f"{'mode':>6} {'streams':>8} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} "
          f"{'steps':>7} {'cpu ms/step':>10}")
    rows: list[dict] = []
    loop = new_event_loop()
    for mode in args.modes.split(","):
        tokens = args.noop_tokens if mode == "noop" else args.model_tokens
        rows += loop.run_until_complete(run_mode(mode, stream_counts, tokens, args.prompt_len))
    loop.close()
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
