"""What each part of a batch-1 decode step costs where it runs: the step's CUDA graph (random weights of a
real model's shapes, bfloat16) replayed as captured, and again with parts taken out or configs changed.

A profiler's kernel times overlap under programmatic dependent launch (a kernel starts while the one
before it finishes), so they do not add up to the step. Taking a kernel out of the graph and timing the
replay says what it costs in the chain. A variant that drops a kernel computes garbage: it is a timing,
not a model.

Variants, NAME:SETTING;SETTING..., each a capture of its own, timed in alternating rounds:
    drop=attention|qk_rope|norms   leave out decode attention, the q/k norm + rotary + KV store kernel, or
                                   the RMSNorms (with their residual adds); several joined by "+"
    gemv_qkv|gemv_o|gemv_gate_up|gemv_down=BLOCK_N,BLOCK_K,WARPS   that GEMV's config
    partition=N                    decode attention's partition size (keys)

On the GPU machine:
    python benchmarks/decode_step.py --shape qwen3-8b --context 256 base: no_attention:drop=attention \\
        down8:gemv_down=8,1024,4
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.shapes import SHAPES, shape_folder  # noqa: E402

DROPS = ("attention", "qk_rope", "norms")
GEMV_KINDS = ("qkv", "o", "gate_up", "down")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """"name:key=value;key=value" -> (name, settings); a ValueError names what is wrong."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r}: a name comes first (name:settings)")
    settings = {}
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        known = key == "drop" or key == "partition" or key.removeprefix("gemv_") in GEMV_KINDS
        if not sep or not known:
            raise ValueError(f"variant {text!r}: unknown setting {item!r}")
        if key == "drop" and not set(value.split("+")) <= set(DROPS):
            raise ValueError(f"variant {text!r}: drop takes {', '.join(DROPS)}")
        settings[key] = value
    return name, settings


def gemv_kinds(layer) -> dict[tuple[int, int], str]:
    """(rows, columns) of each GEMV weight of a decoder layer -> its name in gemv_* settings."""
    attention, mlp = layer.self_attn, layer.mlp
    weights = {"qkv": attention.qkv_proj, "o": attention.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}
    return {tuple(module.weight.shape): kind for kind, module in weights.items()}


@contextlib.contextmanager
def applied(settings: dict[str, str], backend, kinds: dict[tuple[int, int], str]):
    """The variant's changes to module attributes, undone on exit."""
    import torch

    import workers.kernels.fused as fused
    import workers.kernels.gemv as gemv
    from workers.layers.attention_triton import TritonAttentionBackend

    saved = []

    def replace(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    drops = set(settings.get("drop", "").split("+")) - {""}
    if "qk_rope" in drops:
        replace(fused, "qk_norm_rope_store", lambda q, *args, **kwargs: q)
    if "attention" in drops:
        replace(TritonAttentionBackend, "attend", lambda self, q, *args, **kwargs: torch.empty_like(q))
    if "norms" in drops:
        replace(fused, "rms_norm", lambda x, weight, eps, residual=None: (x, residual))
    configs = {key.removeprefix("gemv_"): gemv.GemvConfig(*(int(v) for v in value.split(",")))
               for key, value in settings.items() if key.startswith("gemv_")}
    if configs:
        default = gemv.default_config
        replace(gemv, "default_config", lambda n, k: configs.get(kinds.get((n, k))) or default(n, k))
    if "partition" in settings:
        replace(backend, "decode_partition_size", int(settings["partition"]))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--context", type=int, default=256, help="keys the decoded token attends to")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("variants", nargs="*", default=["base:"], help="NAME:SETTINGS (see above)")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variants]

    import numpy as np
    import torch

    from streamvlm.contract.config import EngineConfig, resolve
    from streamvlm.contract.model_source import resolve_model
    from workers.device_settings import resolve_for_device
    from workers.model_runner import ModelRunner
    from workers.rank_messages import StepPlan

    block_size = 16
    blocks = -(-(args.context + 1) // block_size)
    config = EngineConfig(model=shape_folder(args.shape), load_format="dummy", skip_tokenizer_init=True,
                          device="cuda", dtype="bfloat16", max_model_len=args.max_model_len, block_size=block_size,
                          num_kv_blocks=blocks + 1, max_num_seqs=1, max_cuda_graph_batch_size=1,
                          attention_backend="triton")
    source = resolve_model(config.model.model)
    config = resolve(config, source.text_config)
    runner = ModelRunner(config, source, resolve_for_device(config, source.hf_config, tp_size=1))
    if runner.decode_graphs is None:
        raise SystemExit("needs CUDA graphs (a CUDA device)")
    table = list(range(1, blocks + 1))
    position = args.context
    slot = table[position // block_size] * block_size + position % block_size
    plan = StepPlan(input_ids=[7], positions=[position], slot_mapping=np.array([slot], dtype=np.int64).tobytes(),
                    block_tables=np.array([table], dtype=np.int32).tobytes(), block_table_width=blocks,
                    query_lens=[1], seq_lens=[position + 1], logits_rows=[0])
    graphs = runner.decode_graphs
    kinds = gemv_kinds(runner.model.model.layers[0])
    times: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        for name, settings in variants:
            with applied(settings, runner.backend, kinds):
                graphs.capture()
            with torch.inference_mode():
                key = graphs.graph_for(plan)
                graphs.run(plan, key)   # the step's inputs into the graph's buffers
                graph = graphs.graphs[key]
                for _ in range(20):
                    graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.replays):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.replays
            times.setdefault(name, []).append(ms)
            print(f"round {round_index} {name:>20}: {ms:.4f} ms", flush=True)
    print(f"{args.shape}, batch 1, {args.context} keys: ms per graph step, each round")
    for name, values in times.items():
        print(f"{name:>20}: " + " ".join(f"{v:.4f}" for v in values))
    write_json(args.json, {"shape": args.shape, "context": args.context, "ms": times})


if __name__ == "__main__":
    main()
