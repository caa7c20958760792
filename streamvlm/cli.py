"""Command line: ``streamvlm serve`` runs the HTTP + WebSocket server on one port;
``streamvlm generate PROMPT`` streams a completion to the terminal; ``streamvlm worker
--connect tcp://HOST:PORT`` runs a worker group for an engine core on another host.

Every EngineConfig setting (a field of one of its sections) is a flag (``--max-num-seqs`` for
``max_num_seqs``...), and ``--config F`` loads a TOML file of them first; flags win.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from streamvlm.contract.config import FIELD_HELP, SECTIONS, EngineConfig
from streamvlm.environment import (environment_values, is_bool, is_list, parse_value,
                                   variable_name, warn_typos)

# generate's flags for SamplingParams fields (the same names), with a line of help each.
SAMPLING_FLAGS: dict[str, tuple[type, str]] = {
    "max_tokens": (int, "tokens to generate at most"),
    "temperature": (float, "0: greedy"),
    "top_p": (float, "nucleus sampling: the smallest set of tokens with this probability"),
    "top_k": (int, "sample among the k most likely tokens; 0: all"),
    "min_p": (float, "drop tokens less likely than min_p times the most likely one"),
    "repetition_penalty": (float, "> 1 discourages tokens already in the prompt or output"),
    "presence_penalty": (float, "subtracted from the logits of tokens already generated"),
    "frequency_penalty": (float, "subtracted per occurrence of a token already generated"),
    "seed": (int, "seed of this request's sampling"),
    "min_tokens": (int, "tokens to generate before EOS or a stop may end the output"),
}
# Options of serve that are not EngineConfig / GatewaySettings fields and can also come from the
# environment (STREAMVLM_HOST ...): dest -> type.
SERVER_OPTIONS: dict[str, Any] = {"host": str, "port": int, "log_level": str, "config": str,
                                  "api_key_file": str}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _choices(kind: Any) -> tuple[Any, ...] | None:
    """A Literal type's values (argparse choices), else None."""
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _value_parser(kind: Any) -> Any:
    """An argparse type: text to a ``kind`` value, parsed as the environment's values are."""
    def parse(text: str) -> Any:
        try:
            return parse_value(text, kind)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def _add_setting(group: argparse._ArgumentGroup, dest: str, field: msgspec.structs.FieldInfo,
                 help_line: str) -> None:
    flag = "--" + field.name.replace("_", "-")
    default = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    help_text = f"{help_line} (default: {_shown(default)})"
    if is_bool(field.type):
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
        return
    metavar = "A,B,..." if is_list(field.type) else None
    choices = _choices(field.type)
    group.add_argument(flag, dest=dest, default=None, type=_value_parser(field.type),
                       choices=choices, help=help_text,
                       metavar=metavar or (None if choices else field.name.upper()))


def add_engine_flags(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A flag for each EngineConfig setting (and --config); returns dest -> type of each."""
    group = parser.add_argument_group("engine (EngineConfig fields)")
    group.add_argument("--config", metavar="FILE",
                       help="a TOML file of EngineConfig fields (flags and the environment win)")
    kinds: dict[str, Any] = {}
    for field in (f for section in SECTIONS.values() for f in msgspec.structs.fields(section)):
        _add_setting(group, f"engine.{field.name}", field, FIELD_HELP[field.name])
        kinds[f"engine.{field.name}"] = field.type
    return kinds


def add_gateway_flags(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A flag for each GatewaySettings field (and --api-key-file); returns dest -> type of each."""
    from streamvlm.gateway.settings import GATEWAY_FIELD_HELP, GatewaySettings

    group = parser.add_argument_group("server (GatewaySettings fields)")
    kinds: dict[str, Any] = {}
    for field in msgspec.structs.fields(GatewaySettings):
        _add_setting(group, f"gateway.{field.name}", field, GATEWAY_FIELD_HELP[field.name])
        kinds[f"gateway.{field.name}"] = field.type
    group.add_argument("--api-key-file", metavar="PATH",
                       help="read the API key from this file (instead of --api-key)")
    return kinds


def read_api_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path!r}: {exc.strerror}") from exc
    if not key:
        raise ValueError(f"the API key file {path!r} is empty")
    return key


def gateway_settings_from_args(args: argparse.Namespace) -> Any:
    from streamvlm.gateway.settings import GatewaySettings

    settings = {name.removeprefix("gateway."): value for name, value in vars(args).items()
                if name.startswith("gateway.") and value is not None}
    if args.api_key_file is not None:
        if "api_key" in settings:
            raise ValueError("set the API key one way: --api-key / STREAMVLM_API_KEY or "
                             "--api-key-file / STREAMVLM_API_KEY_FILE")
        settings["api_key"] = read_api_key(args.api_key_file)
    try:
        return GatewaySettings(**settings)
    except (TypeError, msgspec.ValidationError) as exc:
        raise ValueError(f"invalid server settings: {exc}") from exc


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {name.removeprefix("engine."): value for name, value in vars(args).items()
                 if name.startswith("engine.") and value is not None}
    if args.config:
        return EngineConfig.from_toml(args.config, **overrides)
    return EngineConfig.from_kwargs(**overrides)


def apply_environment(parser: argparse.ArgumentParser, kinds: Mapping[str, Any],
                      environ: Mapping[str, str]) -> None:
    """STREAMVLM_<NAME> values become the defaults of the options ``kinds`` (dest -> type)
    names, so that a flag given wins; ValueError names a variable with a bad value."""
    names = {dest: dest.rpartition(".")[2] for dest in kinds}
    values = environment_values({names[dest]: kind for dest, kind in kinds.items()}, environ)
    parser.set_defaults(**{dest: values[name] for dest, name in names.items() if name in values})


def _sampling_params(args: argparse.Namespace, defaults: Mapping[str, Any]) -> Any:
    """The flags given, over ``defaults`` (the engine's, from the generation config)."""
    from streamvlm import SamplingParams

    fields = {name: getattr(args, f"sampling_{name}") for name in SAMPLING_FLAGS
              if getattr(args, f"sampling_{name}") is not None}
    return SamplingParams(**{**defaults, **fields}, stop=args.stop or [],
                          stop_token_ids=args.stop_token_ids or [], ignore_eos=args.ignore_eos,
                          skip_special_tokens=args.skip_special_tokens)


async def _stream_generate(args: argparse.Namespace) -> int:
    from streamvlm import AsyncEngine

    config = engine_config_from_args(args)
    prompt: Any = args.prompt
    if args.image:
        parts = [{"type": "image", "image": _image_argument(value)} for value in args.image]
        prompt = [{"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}]
    elif args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
    async with AsyncEngine(config) as engine:
        params = _sampling_params(args, engine.default_sampling_fields)
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


def build_parser() -> tuple[argparse.ArgumentParser, dict[argparse.ArgumentParser, dict[str, Any]]]:
    """The parser, and for each subcommand the options (dest -> type) the environment may set."""
    from streamvlm.contract.sampling import SamplingParams

    parser = argparse.ArgumentParser(prog="streamvlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    from_environment: dict[argparse.ArgumentParser, dict[str, Any]] = {}

    gen = commands.add_parser("generate", help="stream the completion of one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template")
    gen.add_argument("--image", action="append", metavar="PATH_OR_URL",
                     help="an image for the prompt (repeatable; implies --chat)")
    sampling = gen.add_argument_group(
        "sampling (SamplingParams fields; unset: the checkpoint's generation config, else "
        "SamplingParams' defaults)")
    for name, (kind, help_line) in SAMPLING_FLAGS.items():
        # --seed is the engine's (EngineConfig.seed); the request's seed is --sampling-seed.
        flag = "--sampling-seed" if name == "seed" else "--" + name.replace("_", "-")
        default = SamplingParams.__struct_defaults__[SamplingParams.__struct_fields__.index(name)]
        sampling.add_argument(flag, dest=f"sampling_{name}", type=kind, metavar=name.upper(),
                              help=f"{help_line} (default: the generation config's, else "
                                   f"{_shown(default)})")
    sampling.add_argument("--stop", action="append", help="a stop string (repeatable)")
    sampling.add_argument("--stop-token-ids", type=_value_parser(list[int]), metavar="A,B,...",
                          help="token ids that end the output")
    sampling.add_argument("--ignore-eos", action="store_true", help="generate past EOS")
    sampling.add_argument("--skip-special-tokens", action=argparse.BooleanOptionalAction,
                          default=True, help="leave special tokens out of the text")
    gen_kinds = add_engine_flags(gen)
    from_environment[gen] = {**gen_kinds, "config": str}
    gen.set_defaults(handler=_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the "
                                              "WebSocket chat stream on one port")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"the address to listen on (default: {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"the port to listen on; 0: any free port (printed) "
                            f"(default: {DEFAULT_PORT})")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="server log level (default: info)")
    gateway_kinds = add_gateway_flags(serve)
    engine_kinds = add_engine_flags(serve)
    from_environment[serve] = {**gateway_kinds, **engine_kinds, **SERVER_OPTIONS}
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
    return parser, from_environment


def environment_variables() -> set[str]:
    """Every STREAMVLM_* variable the CLI reads."""
    _, from_environment = build_parser()
    return {variable_name(dest.rpartition(".")[2])
            for kinds in from_environment.values() for dest in kinds}


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags over STREAMVLM_* variables (over --config, applied later, over defaults).
    ValueError names a variable with a bad value; likely typos are logged."""
    parser, from_environment = build_parser()
    for subparser, kinds in from_environment.items():
        apply_environment(subparser, kinds, environ)
    warn_typos({variable_name(dest.rpartition(".")[2])
                for kinds in from_environment.values() for dest in kinds}, environ)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    try:
        args = parse_args(argv, os.environ if environ is None else environ)
        return args.handler(args)
    except ValueError as exc:
        print(f"streamvlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
