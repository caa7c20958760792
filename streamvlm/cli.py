"""Command line: ``streamvlm generate PROMPT`` (more subcommands join as the engine grows)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from streamvlm.config import EngineConfig


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file of EngineConfig fields (flags override it)")
    parser.add_argument("--model", help="checkpoint folder, .gguf file, or 'smollm2-135m' "
                                        "(the default)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--num-kv-blocks", type=int)
    parser.add_argument("--load-format", choices=["auto", "safetensors", "gguf", "dummy"])
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                        action="store_false", default=None)
    parser.add_argument("--seed", type=int)


_ENGINE_FLAGS = ("model", "dtype", "device", "max_model_len", "max_num_seqs",
                 "max_num_batched_tokens", "block_size", "num_kv_blocks", "load_format",
                 "enable_prefix_caching", "seed")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    overrides = {name: getattr(args, name) for name in _ENGINE_FLAGS
                 if getattr(args, name) is not None}
    if args.config:
        return EngineConfig.from_toml(args.config, **overrides)
    return EngineConfig.from_kwargs(**overrides)


def _generate(args: argparse.Namespace) -> int:
    from streamvlm import LLM, SamplingParams

    config = engine_config_from_args(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed_sampling)
    fields = {f: getattr(config, f) for f in config.__struct_fields__}
    with LLM(**fields) as llm:
        if args.chat:
            output = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            output = llm.generate(args.prompt, params)[0]
    print(output.text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamvlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", dest="seed_sampling", type=int)
    _add_engine_flags(gen)
    gen.set_defaults(handler=_generate)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"streamvlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
