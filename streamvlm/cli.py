"""Command line: ``streamvlm serve`` runs the HTTP + WebSocket server on one port;
``streamvlm generate PROMPT`` streams a completion to the terminal; ``streamvlm worker
--connect tcp://HOST:PORT`` runs a worker group for an engine core on another host.

Every EngineConfig setting (a field of one of its sections) is a flag (``--max-num-seqs`` for
``max_num_seqs``...), and ``--config F`` loads a TOML file of them first; flags win.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from streamvlm.contract.config import SECTIONS, EngineConfig

SAMPLING_FLAGS: dict[str, type] = {
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
    "seed": int, "min_tokens": int,
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (EngineConfig fields)")
    group.add_argument("--config", help="a TOML file of EngineConfig fields")
    for field in (f for section in SECTIONS.values() for f in msgspec.structs.fields(section)):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, bool | None):
            group.add_argument(flag, dest=f"engine.{field.name}",
                               action=argparse.BooleanOptionalAction, default=None)
        elif str(field.type).startswith(("list", "tuple")):
            group.add_argument(flag, dest=f"engine.{field.name}", default=None,
                               type=lambda text: [v for v in text.split(",") if v],
                               metavar="A,B,...", help=f"comma-separated; default: {field.default!r}")
        else:
            group.add_argument(flag, dest=f"engine.{field.name}", default=None,
                               metavar=field.name.upper(), help=f"default: {field.default!r}")


_GATEWAY_FLAGS_ELSEWHERE = ("api_key", "served_model_name")


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    from streamvlm.gateway.settings import GatewaySettings, flag_arguments

    group = parser.add_argument_group("server limits (GatewaySettings fields)")
    for field in msgspec.structs.fields(GatewaySettings):
        if field.name in _GATEWAY_FLAGS_ELSEWHERE:
            continue
        group.add_argument("--" + field.name.replace("_", "-"), dest=f"gateway.{field.name}",
                           default=None, help=f"default: {field.default!r}",
                           **{"metavar": field.name.upper(), **flag_arguments(field.type)})


def gateway_settings_from_args(args: argparse.Namespace) -> Any:
    from streamvlm.gateway.settings import GatewaySettings

    overrides = {name.removeprefix("gateway."): value for name, value in vars(args).items()
                 if name.startswith("gateway.") and value is not None}
    return GatewaySettings(api_key=args.api_key, served_model_name=args.served_model_name,
                           **overrides)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {name.removeprefix("engine."): value for name, value in vars(args).items()
                 if name.startswith("engine.") and value is not None}
    if args.config:
        return EngineConfig.from_toml(args.config, **overrides)
    return EngineConfig.from_kwargs(**overrides)


def _sampling_params(args: argparse.Namespace) -> Any:
    from streamvlm import SamplingParams

    fields = {name: getattr(args, f"sampling_{name}") for name in SAMPLING_FLAGS
              if getattr(args, f"sampling_{name}") is not None}
    return SamplingParams(stop=args.stop or [], ignore_eos=args.ignore_eos, **fields)


async def _stream_generate(args: argparse.Namespace) -> int:
    from streamvlm import AsyncEngine

    config = engine_config_from_args(args)
    params = _sampling_params(args)
    prompt: Any = args.prompt
    if args.image:
        parts = [{"type": "image", "image": _image_argument(value)} for value in args.image]
        prompt = [{"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}]
    elif args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
    async with AsyncEngine(config) as engine:
        async for delta in engine.stream(prompt, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _image_argument(value: str) -> Any:
    """A URL passes through (fetched by the engine if remote images are allowed); a path named
    on the command line is read here, so it needs no allow_local_image_paths."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read image {value!r}: {exc.strerror}") from exc


def _generate(args: argparse.Namespace) -> int:
    from streamvlm.engine.loop import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(_stream_generate(args))
    finally:
        loop.close()


def _serve(args: argparse.Namespace) -> int:
    from streamvlm import AsyncEngine
    from streamvlm.gateway.app import build_app
    from streamvlm.gateway.server import GatewayServer, server_config

    engine = AsyncEngine(engine_config_from_args(args))
    settings = gateway_settings_from_args(args)
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    app = build_app(engine, settings)
    config = server_config(app, settings, host=args.host, port=args.port,
                           log_level=args.log_level, loop=loop)
    # Bound here, so that --port 0 (any free port) can be reported before serving.
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    print(f"streamvlm: serving on http://{host}:{port}", flush=True)
    GatewayServer(config, app, settings).run(sockets=[sock])
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.remote import run_remote_follower, run_remote_worker

    try:
        if args.follow:
            if args.rank is None:
                raise ValueError("--follow needs --rank (1 .. tensor-parallel-size - 1)")
            run_remote_follower(args.follow, args.rank, args.tensor_parallel_size, model=args.model,
                                device=args.device, devices=args.devices)
        else:
            run_remote_worker(args.connect, model=args.model, devices=args.devices,
                              join_timeout_s=args.join_timeout,
                              tensor_parallel_size=args.tensor_parallel_size,
                              dist_init_method=args.dist_init_method)
    except RuntimeError as exc:
        print(f"streamvlm worker: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _device_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamvlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="stream the completion of one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template")
    gen.add_argument("--image", action="append", metavar="PATH_OR_URL",
                     help="an image for the prompt (repeatable; implies --chat)")
    sampling = gen.add_argument_group("sampling (SamplingParams fields)")
    for name, kind in SAMPLING_FLAGS.items():
        # --seed is the engine's; the per-request seed is --sampling-seed.
        flag = "--sampling-seed" if name == "seed" else "--" + name.replace("_", "-")
        sampling.add_argument(flag, dest=f"sampling_{name}", type=kind)
    sampling.add_argument("--stop", action="append", help="a stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true")
    add_engine_flags(gen)
    gen.set_defaults(handler=_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the "
                                              "WebSocket chat stream on one port")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY")
    serve.add_argument("--served-model-name", help="the model name clients use (default: --model)")
    serve.add_argument("--log-level", default="info")
    add_gateway_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a worker group for an engine core on "
                                                "another host (its remote_worker_groups)")
    role = worker.add_mutually_exclusive_group(required=True)
    role.add_argument("--connect", metavar="tcp://HOST:PORT",
                      help="the engine core's worker_listen_address, as reached from here (rank 0)")
    role.add_argument("--follow", metavar="tcp://HOST:PORT",
                      help="a rank > 0 of a tensor-parallel group: rank 0's --dist-init-method")
    worker.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks of this group, on this and other hosts (default: 1)")
    worker.add_argument("--dist-init-method", metavar="tcp://HOST:PORT",
                        help="rank 0: where the other ranks join (this host; the next port carries "
                             "the step plans)")
    worker.add_argument("--rank", type=int, help="with --follow: this process's rank")
    worker.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="with --follow: the device type, as rank 0's (default: auto)")
    worker.add_argument("--model", help="the checkpoint on this host (default: the core's)")
    worker.add_argument("--devices", type=_device_list, metavar="N",
                        help="the CUDA device to run on (default: 0)")
    worker.add_argument("--join-timeout", type=float, default=600.0, metavar="S",
                        help="give up when no engine core answers in S seconds (default: 600)")
    worker.set_defaults(handler=_worker)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"streamvlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
