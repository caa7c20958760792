"""Linear layers of a decode step (2 to 256 rows): the Triton skinny GEMM (workers/kernels/skinny_gemm.py)
against cuBLAS (F.linear) on the weight shapes of a real model, bfloat16. Each timing replays a CUDA graph
of calls over enough weight copies that none is served from L2, as in a decode step where every layer has
its own weights. Reports microseconds per call and weight-read bandwidth.

On the GPU machine:
    python benchmarks/skinny_gemm.py --shape qwen3-0.6b --json results/skinny_gemm.json
    python benchmarks/skinny_gemm.py --shape qwen3-0.6b --sweep     # every kernel config, best first
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.gemv import linear_shapes, time_calls  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


def sweep_configs(m: int):
    from workers.kernels.skinny_gemm import SkinnyConfig

    block_ms = sorted({min(b, max(16, 1 << (m - 1).bit_length())) for b in (16, 32, 64, 128)})
    for bm, bn, bk, warps, stages in itertools.product(block_ms, (16, 32, 64), (64, 128, 256), (4,), (3, 4)):
        if bm * bk * 2 * stages + bn * bk * 2 * stages > 200_000:   # shared memory
            continue
        yield SkinnyConfig(bm, bn, bk, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default="16,32,64,128,256", help="comma-separated row counts (batch sizes)")
    parser.add_argument("--sweep", action="store_true", help="time every kernel config")
    parser.add_argument("--layers", default="qkv_proj,o_proj,gate_up_proj,down_proj,lm_head")
    parser.add_argument("--l2-flush-bytes", type=float, default=512e6,
                        help="weight copies per shape add up to at least this many bytes")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from workers.kernels.skinny_gemm import default_config, skinny_linear

    torch.manual_seed(0)
    rows = []
    layers = args.layers.split(",")
    for name, (n, k) in linear_shapes(SHAPES[args.shape]).items():
        if name not in layers:
            continue
        nbytes = n * k * 2
        copies = max(2, min(64, int(args.l2_flush_bytes // nbytes) + 1))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            reference = x.float() @ weights[0].float().T
            error = (skinny_linear(x, weights[0]).float() - reference).abs().max().item()
            cublas = time_calls(lambda a, w: F.linear(a, w), weights, x)
            configs = list(sweep_configs(m)) if args.sweep else [default_config(m, n, k)]
            timed = []
            for c in configs:
                try:
                    timed.append((time_calls(lambda a, w, c=c: skinny_linear(a, w, config=c), weights, x), c))
                except Exception as exc:   # a config out of resources: skipped in the sweep
                    print(f"  {name} m{m} {c}: {type(exc).__name__}", file=sys.stderr)
            timed.sort()
            best, config = timed[0]
            rows.append(dict(layer=name, m=m, n=n, k=k, cublas_us=cublas * 1e6, skinny_us=best * 1e6,
                             cublas_tbps=nbytes / cublas / 1e12, skinny_tbps=nbytes / best / 1e12,
                             config=config._asdict(), max_abs_error=error,
                             top=[dict(us=t * 1e6, **c._asdict()) for t, c in timed[:5]]))
            r = rows[-1]
            c = r["config"]
            print(f"{name:<13}{m:>5}{n:>8}{k:>7}{r['cublas_us']:>9.1f}{r['cublas_tbps']:>6.2f}"
                  f"{r['skinny_us']:>9.1f}{r['skinny_tbps']:>6.2f}  m{c['block_m']} n{c['block_n']} k{c['block_k']}"
                  f" w{c['num_warps']} s{c['num_stages']}  err {error:.1e}", flush=True)
            if args.sweep:
                print("   top:", ", ".join(f"m{t['block_m']} n{t['block_n']} k{t['block_k']} w{t['num_warps']}"
                                           f" s{t['num_stages']} {t['us']:.1f}" for t in r["top"]), flush=True)
        del weights
        torch.cuda.empty_cache()
    write_json(args.json, dict(shape=args.shape, device=torch.cuda.get_device_name(), rows=rows))


if __name__ == "__main__":
    main()
