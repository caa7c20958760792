"""What the benchmarks share besides model shapes."""

from __future__ import annotations

import json
from pathlib import Path

# --async-scheduling, as EngineConfig.async_scheduling.
ASYNC_SCHEDULING = {"auto": None, "on": True, "off": False}


def write_json(path: str | None, data: object) -> None:
    """A benchmark's --json result (nothing when path is None), its folder made if need be."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
