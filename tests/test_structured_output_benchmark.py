"""benchmarks/structured_output.py in a tiny configuration: both batches run, produce the same
tokens (the default schema outlasts max_tokens), and the JSON result says what was measured."""

from __future__ import annotations

import json

from benchmarks.structured_output import main


def test_structured_output_benchmark_runs_tiny(llama_path, tmp_path):
    out = tmp_path / "result.json"
    result = main(["--model", str(llama_path), "--num-requests", "4", "--min-len", "8",
                   "--max-len", "16", "--device", "cpu", "--dtype", "float32",
                   "--max-model-len", "64", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["constrained_requests"] == 2
    plain, constrained = result["without_schema"], result["with_schema"]
    assert plain["requests"] == constrained["requests"] == 4
    assert plain["output_tokens"] == constrained["output_tokens"] > 0
    assert result["overhead_percent"] == round(
        100 * (1 - constrained["output_tokens_per_s"] / plain["output_tokens_per_s"]), 1)
