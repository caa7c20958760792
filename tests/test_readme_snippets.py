"""The README's Python examples run verbatim, without an `if __name__ == "__main__":` guard,
from a file, from stdin and from `python -c` (as a notebook runs code: no file to re-import),
with worker processes: starting a worker must not run the user's __main__ again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "snippet-start"   # printed once by the snippet's top level; twice if a worker ran it
TIMEOUT_S = 240


def readme_block(section: str) -> str:
    """The first ```python block under the README heading `## {section}`."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, section
    return match.group(1)


def offline_snippet(model: Path) -> str:
    code = readme_block("Offline API")
    assert "with LLM() as llm:" in code
    return code.replace("with LLM() as llm:", f"with LLM({str(model)!r}, device='cpu', "
                        "worker_backend='process', max_model_len=256) as llm:")


def streaming_snippet(model: Path) -> str:
    code = readme_block("Streaming API")
    assert "EngineConfig(max_model_len=2048)" in code
    return code.replace("EngineConfig(max_model_len=2048)",
                        f"EngineConfig(model={str(model)!r}, device='cpu', "
                        "worker_backend='process', max_model_len=256)")


SNIPPETS = {"offline": offline_snippet, "streaming": streaming_snippet}


def run_snippet(code: str, how: str, folder: Path) -> subprocess.CompletedProcess[str]:
    source = f"print({MARKER!r}, flush=True)\n{code}"
    assert "__main__" not in source
    path = folder / "snippet.py"
    path.write_text(source)
    # A folder of its own: nothing there for a re-imported __main__ or `workers` to find.
    common = dict(cwd=folder, capture_output=True, text=True, timeout=TIMEOUT_S)
    if how == "file":
        return subprocess.run([sys.executable, str(path)], **common)
    if how == "stdin":
        with path.open() as stdin:
            return subprocess.run([sys.executable, "-"], stdin=stdin, **common)
    return subprocess.run([sys.executable, "-c", source], **common)


@pytest.mark.parametrize("how", ["file", "stdin", "command"])
@pytest.mark.parametrize("snippet", sorted(SNIPPETS))
def test_readme_snippet_runs_without_a_main_guard(snippet, how, llama_path, tmp_path):
    done = run_snippet(SNIPPETS[snippet](llama_path), how, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(MARKER) == 1, done.stdout[-2000:] + done.stderr[-2000:]
    # The last line each snippet prints names why generation ended: it generated.
    assert re.search(r"\b(stop|length)\b", done.stdout), done.stdout[-2000:]
    assert "bootstrapping phase" not in done.stderr
