"""The split-K product and the RMSNorm that adds its parts (workers/kernels/split_k_gemm.py) against cuBLAS
and the norm after it, on the linear layers whose output only a norm reads (the attention output and down
projections), for decode batches. Each timing replays a CUDA graph of calls over enough weight copies that
L2 serves none. Microseconds per product and norm.

On the GPU machine:
    python benchmarks/split_k_gemm.py --shape qwen3-0.6b
    python benchmarks/split_k_gemm.py --shape qwen3-0.6b --sweep     # every config, best first
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import seconds_per_replay, write_json  # noqa: E402
from benchmarks.gemv import linear_shapes  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default="16,32,64,128,192,256")
    parser.add_argument("--sweep", action="store_true", help="time every config")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from workers.kernels.fused import rms_norm, rms_norm_of_parts
    from workers.kernels.launch import multiprocessors
    from workers.kernels.split_k_gemm import SplitKConfig, default_config, split_k_parts

    def per_call(config, x, residual, norm_weight, weights) -> float:
        """us per product and norm: cuBLAS and rms_norm with config None, else the split and rms_norm_of_parts."""
        def calls() -> None:
            for w in weights:
                if config is None:
                    rms_norm(F.linear(x, w), norm_weight, 1e-6, residual)
                else:
                    rms_norm_of_parts(split_k_parts(x, w, config), norm_weight, 1e-6, residual)
        return seconds_per_replay(calls, 20) / len(weights) * 1e6

    shapes = linear_shapes(SHAPES[args.shape])
    sms = multiprocessors(0)
    rows_out = []
    for layer in ("o_proj", "down_proj"):
        n, k = shapes[layer]
        copies = max(2, int(256e6 // (n * k * 2)) + 1)
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5 for _ in range(copies)]
        norm_weight = torch.ones(n, dtype=torch.bfloat16, device="cuda")
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            residual = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
            cublas = per_call(None, x, residual, norm_weight, weights)
            config = default_config(m, n, k, sms)
            split = per_call(config, x, residual, norm_weight, weights) if config else None
            top = []
            if args.sweep:
                for bm, bn, bk, s, st in itertools.product((16, 32, 64, 128), (32, 64, 128), (64, 128),
                                                          (2, 4, 8, 16), (3, 4)):
                    if bm > max(16, 2 * m) or n % bn or k % (s * bk) or bm * bn * bk * st > 96 * 1024:
                        continue
                    c = SplitKConfig(bm, bn, bk, s, 4, st)
                    top.append((per_call(c, x, residual, norm_weight, weights), c))
                top.sort()
            rows_out.append(dict(layer=layer, n=n, k=k, rows=m, cublas_and_norm_us=cublas, split_k_and_norm_us=split,
                                 config=config._asdict() if config else None,
                                 top=[dict(us=t, **c._asdict()) for t, c in top[:4]]))
        del weights
        torch.cuda.empty_cache()

    print(f"{'layer':<10}{'N':>6}{'K':>6}{'rows':>6}{'cuBLAS+norm us':>16}{'split-K+norm us':>17}  config")
    for r in rows_out:
        c = r["config"]
        split = f"{r['split_k_and_norm_us']:.2f}" if c else "-"
        desc = f"m{c['block_m']} n{c['block_n']} k{c['block_k']} x{c['splits']}" if c else "cuBLAS"
        print(f"{r['layer']:<10}{r['n']:>6}{r['k']:>6}{r['rows']:>6}{r['cublas_and_norm_us']:>16.2f}{split:>17}"
              f"  {desc}")
        for t in r["top"]:
            print(f"{'':<28}{t['us']:>33.2f}  m{t['block_m']} n{t['block_n']} k{t['block_k']} x{t['splits']} "
                  f"s{t['num_stages']}")
    write_json(args.json, dict(shape=args.shape, device=torch.cuda.get_device_name(), rows=rows_out))


if __name__ == "__main__":
    main()
