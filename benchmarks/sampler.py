"""The draw's cost per step: one token per row from bfloat16 logits of a real model's vocabulary,
with the fused draw (workers/kernels/sampling.py) and with the torch ops it replaces (float32 copy,
temperature, softmax, exponential noise, division, argmax).

Device time: microseconds per CUDA graph replay of the draw alone. Host time: microseconds of
Sampler.launch on the host (its lists, transfers and launches; the device is not waited for).

On the GPU machine:
    python benchmarks/sampler.py --vocab 151936 --json results/sampler.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import seconds_per_replay, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batches", default="1,16,64,128,256")
    parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import time

    import torch

    from streamvlm.contract.sampling import SamplingParams
    from workers.kernels.sampling import gumbel_argmax
    from workers.sampler import Sampler
    from workers.sequence import Sequence

    device = torch.device("cuda")
    rows = []
    print(f"{'batch':>6} {'fused us':>9} {'torch us':>9} {'speed-up':>8} {'host us fused':>14} {'host us torch':>14}"
          f"   (vocab {args.vocab}, temperature {args.temperature}; device time per draw, host time per launch)")
    for batch in (int(b) for b in args.batches.split(",")):
        logits = torch.randn(batch, args.vocab, device=device, dtype=torch.bfloat16)
        inv_temps = torch.full((batch,), 1 / args.temperature, device=device)
        seeds = torch.arange(batch, dtype=torch.int64, device=device)

        def fused_draw(logits=logits, inv_temps=inv_temps, seeds=seeds):
            gumbel_argmax(logits, inv_temps, seeds)

        def torch_draw(logits=logits):
            probs = (logits.float() / args.temperature).softmax(dim=-1)
            (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)

        device_us = [seconds_per_replay(draw, args.repeats) * 1e6 for draw in (fused_draw, torch_draw)]
        seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(temperature=args.temperature, max_tokens=16), [0], 0)
                for i in range(batch)]
        host_us = []
        for fused in (True, False):
            sampler = Sampler(device, seed=0)
            sampler.fused_draw = fused
            sampler.launch(logits, seqs).ready.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                pending = sampler.launch(logits, seqs)
            host_us.append((time.perf_counter() - start) / args.repeats * 1e6)
            pending.ready.synchronize()
        rows.append({"batch": batch, "fused_us": round(device_us[0], 1), "torch_us": round(device_us[1], 1),
                     "host_fused_us": round(host_us[0], 1), "host_torch_us": round(host_us[1], 1)})
        print(f"{batch:>6} {device_us[0]:>9.1f} {device_us[1]:>9.1f} {device_us[1] / device_us[0]:>7.2f}x "
              f"{host_us[0]:>14.1f} {host_us[1]:>14.1f}")
    if args.json:
        write_json(args.json, {"vocab": args.vocab, "temperature": args.temperature, "rows": rows})


if __name__ == "__main__":
    main()
