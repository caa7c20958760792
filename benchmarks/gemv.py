"""One-row linear layers (batch-1 decode): the Triton GEMV (workers/kernels/gemv.py) against
cuBLAS (F.linear) on the weight shapes of a real model, bfloat16. Each timing replays a CUDA
graph of calls over enough weight copies that none is served from L2, as in a decode step where
every layer has its own weights. Reports microseconds per call and weight-read bandwidth.

On the GPU machine:
    python benchmarks/gemv.py --shape qwen3-8b --json results/gemv.json
    python benchmarks/gemv.py --shape qwen3-8b --sweep        # every kernel config, best first
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import seconds_per_replay, write_json  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear layer of a decoder (tensor-parallel size 1)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    return {"qkv_proj": ((heads + 2 * kv_heads) * head_dim, h), "o_proj": (h, heads * head_dim),
            "gate_up_proj": (2 * inter, h), "down_proj": (h, inter), "lm_head": (cfg["vocab_size"], h)}


def time_calls(fn, weights: list, x, repeats: int = 20) -> float:
    """Seconds per call of fn(x, w), replayed from a CUDA graph cycling over ``weights``."""
    def calls() -> None:
        for w in weights:
            fn(x, w)

    return seconds_per_replay(calls, repeats) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--sweep", action="store_true", help="time every kernel config")
    parser.add_argument("--l2-flush-bytes", type=float, default=512e6,
                        help="weight copies per shape add up to at least this many bytes")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from workers.kernels.gemv import GemvConfig, default_config, gemv

    torch.manual_seed(0)
    rows = []
    for name, (n, k) in linear_shapes(SHAPES[args.shape]).items():
        nbytes = n * k * 2
        copies = max(2, min(64, int(args.l2_flush_bytes // nbytes) + 1))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        reference = x.float() @ weights[0].float().T
        error = (gemv(x, weights[0]).float() - reference).abs().max().item()
        cublas = time_calls(lambda a, w: F.linear(a, w), weights, x)
        configs = ([GemvConfig(*c) for c in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (2, 4, 8))]
                   if args.sweep else [default_config(n, k)])
        timed = sorted((time_calls(lambda a, w, c=c: gemv(a, w, config=c), weights, x), c) for c in configs)
        best, config = timed[0]
        rows.append(dict(layer=name, n=n, k=k, cublas_us=cublas * 1e6, gemv_us=best * 1e6,
                         cublas_tbps=nbytes / cublas / 1e12, gemv_tbps=nbytes / best / 1e12,
                         config=config._asdict(), max_abs_error=error,
                         top=[dict(us=t * 1e6, **c._asdict()) for t, c in timed[:5]]))
        del weights
        torch.cuda.empty_cache()

    print(f"{'layer':<13}{'N':>8}{'K':>7}{'cuBLAS us':>11}{'TB/s':>7}{'GEMV us':>10}{'TB/s':>7}  config")
    for r in rows:
        c = r["config"]
        print(f"{r['layer']:<13}{r['n']:>8}{r['k']:>7}{r['cublas_us']:>11.1f}{r['cublas_tbps']:>7.2f}"
              f"{r['gemv_us']:>10.1f}{r['gemv_tbps']:>7.2f}  n{c['block_n']} k{c['block_k']} w{c['num_warps']}"
              f"  err {r['max_abs_error']:.1e}")
        if args.sweep:
            print("   top:", ", ".join(f"n{t['block_n']} k{t['block_k']} w{t['num_warps']} {t['us']:.1f}"
                                       for t in r["top"]))
    write_json(args.json, dict(shape=args.shape, device=torch.cuda.get_device_name(), rows=rows))


if __name__ == "__main__":
    main()
