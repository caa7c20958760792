"""The engine core's own cost on CPU: tokens/s into concurrent streams.

Two modes on the embedded SmolLM2 (its real tokenizer, so detokenization is real work):
  model  the worker runs the model (what a CPU deployment delivers);
  noop   the worker samples random tokens without a forward pass (skip_model_forward), so the
         numbers show the ceiling of the engine core, ZeroMQ, msgspec and detokenization.
Engine-core CPU time per step is this process's CPU time (the worker is another process)
divided by the step outputs it received.

    python benchmarks/frontend.py                      # both modes, 1 / 64 / 256 / 1024 streams
    python benchmarks/frontend.py --modes noop --json results/frontend.json

--ws measures the whole WebSocket path instead: the gateway (uvicorn, /v1/ws) in this process
with a noop worker process, and the clients (one chat per connection, ignore_eos) in a child
process, counting the tokens that reach them. --sse does the same over HTTP: one
/v1/chat/completions request with stream=true per connection. Both kinds of client have their
connections established before the clock starts (the WebSocket handshake; for SSE a small GET on
each connection, as a pool's kept-alive connections): the first delta is timed from the request's
send.

    python benchmarks/frontend.py --ws --streams 64 --noop-tokens 1024
    python benchmarks/frontend.py --sse --streams 256 --coalesce-ms 20

Columns: tokens/s that reached the consumers; deltas (frames, SSE events) per second and
tokens per delta (the engine merges a stream's output while its consumer is behind, and every
--coalesce-ms); over every consumer's deltas the gap between two deltas at p50 and p99 and
the first delta's latency at p50; the engine-core CPU per step (for --ws/--sse: the
server process, engine core + gateway) and the worker's (which bounds the step rate).
--coalesce-ms passes a delta-coalescing interval (engine.stream's coalesce_s, the gateway's
stream_coalesce_ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402

def worker_cpu_s(engine) -> float:
    """CPU seconds the engine's worker processes have used so far (Linux /proc; 0 elsewhere, or
    for a thread worker)."""
    total = 0.0
    for group in engine.groups:
        for process in group.processes:
            pid = getattr(process, "pid", None)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, TypeError):
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_fields(first: list[float], gaps: list[float], max_gaps: list[float]) -> dict:
    """Seconds in, milliseconds out: first delta p50, gap between deltas p50/p99 (every gap of
    every consumer) and the median over consumers of their longest gap."""
    return {"first_delta_ms_p50": round(1000 * percentile(first, 0.5), 1),
            "gap_ms_p50": round(1000 * percentile(gaps, 0.5), 2),
            "gap_ms_p99": round(1000 * percentile(gaps, 0.99), 1),
            "max_gap_ms_p50": round(1000 * percentile(max_gaps, 0.5), 1)}


async def run_case(engine, streams: int, max_tokens: int, prompt_len: int,
                   coalesce_s: float = 0.0) -> dict:
    from streamvlm import SamplingParams

    rng = random.Random(streams)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(prompt_len)]}
               for _ in range(streams)]
    coalesce = {"coalesce_s": coalesce_s} if coalesce_s else {}
    received = deltas = 0
    first: list[float] = []
    gaps: list[float] = []
    max_gaps: list[float] = []

    async def consume(prompt) -> None:
        nonlocal received, deltas
        start = last = time.perf_counter()
        tokens, longest = 0, 0.0
        async for delta in engine.stream(prompt, params, **coalesce):
            now = time.perf_counter()
            if tokens:
                gaps.append(now - last)
                longest = max(longest, now - last)
            elif delta.token_ids:
                first.append(now - start)
            last = now
            tokens += len(delta.token_ids)
            deltas += 1
        received += tokens
        max_gaps.append(longest)

    steps_before = (await engine.stats()).num_steps
    worker_before = worker_cpu_s(engine)
    cpu_before, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(consume(p) for p in prompts))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    worker_cpu = worker_cpu_s(engine) - worker_before
    steps = (await engine.stats()).num_steps - steps_before
    return {"streams": streams, "tokens": received, "deltas": deltas,
            "seconds": round(elapsed, 3), "tokens_per_s": round(received / elapsed),
            "tokens_per_delta": round(received / max(deltas, 1), 2), "steps": steps,
            "core_cpu_ms_per_step": round(1000 * cpu / max(steps, 1), 3),
            "worker_cpu_ms_per_step": round(1000 * worker_cpu / max(steps, 1), 3),
            **latency_fields(first, gaps, max_gaps)}


def print_header(server: bool) -> None:
    print(f"{'mode':>10} {'streams':>7} {'tokens':>8} {'seconds':>7} {'tokens/s':>9} "
          f"{'deltas/s':>9} {'tok/dlt':>7} {'1st p50':>8} {'gap p50':>8} {'gap p99':>8} "
          f"{'cpu ms/step':>11} {'wrk ms/step':>11}"
          + (f" {'srv cpu':>7} {'cli cpu':>7}" if server else ""),
          flush=True)


def print_row(row: dict) -> None:
    print(f"{row['mode']:>10} {row['streams']:>7} {row['tokens']:>8} {row['seconds']:>7.2f} "
          f"{row['tokens_per_s']:>9} {round(row['deltas'] / row['seconds']):>9} "
          f"{row['tokens_per_delta']:>7} {row['first_delta_ms_p50']:>8} {row['gap_ms_p50']:>8} "
          f"{row['gap_ms_p99']:>8} {row['core_cpu_ms_per_step']:>11} "
          f"{row['worker_cpu_ms_per_step']:>11}"
          + (f" {row['server_cpu_s']:>7} {row['client_cpu_s']:>7}" if "server_cpu_s" in row
             else ""), flush=True)


async def run_mode(mode: str, stream_counts: list[int], max_tokens: int, prompt_len: int,
                   coalesce_s: float) -> list[dict]:
    from streamvlm import AsyncEngine, EngineConfig

    config = EngineConfig(device="cpu", max_model_len=2048, max_num_seqs=max(stream_counts),
                          max_num_batched_tokens=8192, skip_model_forward=mode == "noop")
    results = []
    async with AsyncEngine(config) as engine:
        await run_case(engine, 4, 8, prompt_len)   # warm-up
        for streams in stream_counts:
            row = {"mode": mode, **await run_case(engine, streams, max_tokens, prompt_len,
                                                  coalesce_s)}
            results.append(row)
            print_row(row)
    return results


# ---- WebSocket and SSE modes: server in this process, clients in a child process -------------

class SseUsage(msgspec.Struct):
    completion_tokens: int


class SseDelta(msgspec.Struct, frozen=True):
    content: str | None = None


class SseChoice(msgspec.Struct):
    delta: SseDelta = SseDelta()


class SseChunk(msgspec.Struct):
    """What an SSE client reads of a chat.completion.chunk: content, and the final usage."""

    choices: list[SseChoice] = []
    usage: SseUsage | None = None


class _Timeline:
    """One client's deltas: when the first came and the gaps between the others."""

    def __init__(self, sent: float) -> None:
        self.sent = self.last = sent
        self.first = 0.0
        self.gaps: list[float] = []
        self.deltas = 0

    def delta(self) -> None:
        now = time.perf_counter()
        if self.deltas:
            self.gaps.append(now - self.last)
        else:
            self.first = now - self.sent
        self.last = now
        self.deltas += 1


def _summary(timelines: list[_Timeline], tokens: int, seconds: float, cpu: float) -> dict:
    gaps = [g for t in timelines for g in t.gaps]
    return {"tokens": tokens, "deltas": sum(t.deltas for t in timelines), "seconds": seconds,
            "client_cpu_s": cpu,
            **latency_fields([t.first for t in timelines], gaps,
                             [max(t.gaps, default=0.0) for t in timelines])}


def ws_clients(url: str, streams: int, max_tokens: int, prompt_len: int, compression: bool,
               conn) -> None:
    """Child process: ``streams`` WebSocket connections, one chat each."""
    import msgspec
    from websockets.asyncio.client import connect

    from streamvlm.engine.loop import new_event_loop

    class Event(msgspec.Struct):
        type: str
        token_ids: list[int] = []
        finish_reason: str | None = None

    decode = msgspec.json.Decoder(Event).decode
    rng = random.Random(streams)

    async def one(i: int, ws) -> tuple[int, _Timeline]:
        prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
        timeline = _Timeline(time.perf_counter())
        await ws.send(json.dumps({"type": "chat.create", "id": f"c{i}", "prompt": prompt,
                                  "params": {"temperature": 0, "max_tokens": max_tokens,
                                             "ignore_eos": True}}))
        tokens = 0
        while True:
            event = decode(await ws.recv())
            if event.type == "chat.delta":
                timeline.delta()
                tokens += len(event.token_ids)
            elif event.type == "chat.done":
                return tokens, timeline
            elif event.type == "error":
                raise RuntimeError(f"error event: {event}")

    async def main() -> dict:
        sockets = [await connect(url, compression="deflate" if compression else None,
                                 max_size=None, proxy=None) for _ in range(streams)]
        cpu_before, start = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(one(i, ws) for i, ws in enumerate(sockets)))
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_before
        for ws in sockets:
            await ws.close()
        return _summary([t for _, t in results], sum(n for n, _ in results), elapsed, cpu)

    _run_clients(new_event_loop(), main, conn)


def sse_clients(url: str, streams: int, max_tokens: int, prompt_len: int, compression: bool,
                conn) -> None:
    """Child process: ``streams`` HTTP connections, one streamed chat completion each, read
    with a minimal HTTP/1.1 client (chunked transfer coding) so that the clients cost little.
    As the WebSocket clients (and a connection pool), they connect before the clock starts, and
    each connection answers a small request first: a connection the client has opened may not
    yet be accepted by the server, which would then accept it while timing the burst."""
    import msgspec

    from streamvlm.engine.loop import new_event_loop

    del compression
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    rng = random.Random(streams)

    decode = msgspec.json.Decoder(SseChunk).decode

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                  ) -> tuple[int, _Timeline]:
        words = " ".join(str(rng.randrange(1000)) for _ in range(prompt_len))
        body = json.dumps({"messages": [{"role": "user", "content": words}], "stream": True,
                           "stream_options": {"include_usage": True}, "temperature": 0,
                           "max_tokens": max_tokens, "ignore_eos": True}).encode()
        timeline = _Timeline(time.perf_counter())
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"SSE request refused: {head[:200]!r}")
        tokens, buffer = 0, b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += chunk[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                parsed = decode(data)
                if parsed.usage is not None:
                    tokens = parsed.usage.completion_tokens
                elif parsed.choices and parsed.choices[0].delta.content:
                    timeline.delta()
        writer.close()
        return tokens, timeline

    async def warm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One small request on the connection, so that the server has accepted it and set it
        up before the clock starts (a pool's kept-alive connection), as a WebSocket handshake
        does for the WebSocket clients."""
        writer.write(b"GET /version HTTP/1.1\r\nHost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)

    async def main() -> dict:
        connections = [await asyncio.open_connection(host, int(port)) for _ in range(streams)]
        await asyncio.gather(*(warm(*connection) for connection in connections))
        cpu_before, start = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(one(*connection) for connection in connections))
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_before
        return _summary([t for _, t in results], sum(n for n, _ in results), elapsed, cpu)

    _run_clients(new_event_loop(), main, conn)


def _run_clients(loop, main, conn) -> None:
    try:
        conn.send(loop.run_until_complete(main()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"error": repr(exc)})
    finally:
        loop.close()


async def run_client_case(engine, kind: str, url: str, streams: int, max_tokens: int,
                          prompt_len: int, compression: bool) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    target = ws_clients if kind == "ws" else sse_clients
    proc = ctx.Process(target=target, args=(url, streams, max_tokens, prompt_len,
                                            compression, child), daemon=True)
    steps_before = (await engine.stats()).num_steps
    worker_before = worker_cpu_s(engine)
    cpu_before = time.process_time()
    proc.start()
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(None, parent.recv)
    await loop.run_in_executor(None, proc.join)
    if "error" in result:
        raise RuntimeError(f"{kind} clients failed: {result['error']}")
    server_cpu = time.process_time() - cpu_before   # includes the clients' connect phase
    worker_cpu = worker_cpu_s(engine) - worker_before
    steps = (await engine.stats()).num_steps - steps_before
    tokens, seconds = result["tokens"], result["seconds"]
    return {"mode": kind + ("+deflate" if compression else ""), "streams": streams,
            "tokens": tokens, "deltas": result["deltas"], "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds),
            "tokens_per_delta": round(tokens / max(result["deltas"], 1), 2), "steps": steps,
            "core_cpu_ms_per_step": round(1000 * server_cpu / max(steps, 1), 3),
            "worker_cpu_ms_per_step": round(1000 * worker_cpu / max(steps, 1), 3),
            "first_delta_ms_p50": result["first_delta_ms_p50"],
            "gap_ms_p50": result["gap_ms_p50"], "gap_ms_p99": result["gap_ms_p99"],
            "max_gap_ms_p50": result["max_gap_ms_p50"],
            "client_cpu_s": round(result["client_cpu_s"], 2),
            "server_cpu_s": round(server_cpu, 2)}


async def run_server(kind: str, stream_counts: list[int], max_tokens: int, prompt_len: int,
                     compression: bool, coalesce_ms: float) -> list[dict]:
    import socket

    import uvicorn

    from streamvlm import AsyncEngine, EngineConfig
    from streamvlm.gateway.app import build_app
    from streamvlm.gateway.server import server_config
    from streamvlm.gateway.settings import GatewaySettings

    most = max(stream_counts)
    config = EngineConfig(device="cpu", max_model_len=2048, max_num_seqs=most,
                          max_num_batched_tokens=8192, skip_model_forward=True,
                          worker_backend="process")
    engine = AsyncEngine(config)
    settings = {"max_connections": most + 16}
    if coalesce_ms:
        settings["stream_coalesce_ms"] = coalesce_ms
    app = build_app(engine, GatewaySettings(**settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The gateway's own server configuration (HTTP protocol and connection guards), as
    # `streamvlm serve` runs it.
    config = server_config(app, app.state.settings, port=port, log_level="warning")
    config.backlog = 4096
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.05)
    url = f"ws://127.0.0.1:{port}/v1/ws" if kind == "ws" else f"http://127.0.0.1:{port}/"
    results = []
    try:
        await run_client_case(engine, kind, url, 4, 8, prompt_len, compression)   # warm-up
        for streams in stream_counts:
            row = await run_client_case(engine, kind, url, streams, max_tokens, prompt_len,
                                        compression)
            results.append(row)
            print_row(row)
    finally:
        server.should_exit = True
        await serving
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="model,noop")
    parser.add_argument("--streams", default="1,64,256,1024",
                        help="comma-separated stream counts, one row each")
    parser.add_argument("--noop-tokens", type=int, default=1024, help="output tokens per stream")
    parser.add_argument("--model-tokens", type=int, default=32, help="output tokens per stream")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--coalesce-ms", type=float, default=0.0,
                        help="delta-coalescing interval (default 0: off)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--ws", action="store_true",
                        help="through the WebSocket gateway (noop worker, clients in a child "
                             "process) instead of engine.stream")
    parser.add_argument("--sse", action="store_true",
                        help="through HTTP /v1/chat/completions with stream=true (noop worker, "
                             "clients in a child process) instead of engine.stream")
    parser.add_argument("--deflate", action="store_true",
                        help="--ws: negotiate permessage-deflate, as browsers do")
    args = parser.parse_args()

    from streamvlm.engine.loop import new_event_loop

    stream_counts = [int(n) for n in args.streams.split(",")]
    rows: list[dict] = []
    loop = new_event_loop()
    if args.ws or args.sse:
        print_header(server=True)
        for kind in ["ws"] * args.ws + ["sse"] * args.sse:
            rows += loop.run_until_complete(run_server(kind, stream_counts, args.noop_tokens,
                                                       args.prompt_len, args.deflate,
                                                       args.coalesce_ms))
    else:
        print_header(server=False)
        for mode in args.modes.split(","):
            tokens = args.noop_tokens if mode == "noop" else args.model_tokens
            rows += loop.run_until_complete(run_mode(mode, stream_counts, tokens,
                                                     args.prompt_len, args.coalesce_ms / 1000))
    loop.close()
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
