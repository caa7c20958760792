"""streamvlm: a streaming inference engine for vision-language models and LLMs.

The public names load on first use, so that a worker process importing the contract
(``streamvlm.contract``) does not load the engine core with it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "AsyncEngine": "streamvlm.engine.async_engine",
    "EngineStats": "streamvlm.metrics",
    "HealthReport": "streamvlm.engine.group_health",
    "LLM": "streamvlm.engine.llm",
    "OutputDelta": "streamvlm.engine.request_state",
    "Usage": "streamvlm.engine.request_state",
    "EngineConfig": "streamvlm.contract.config",
    "EngineDeadError": "streamvlm.errors",
    "EngineOverloadedError": "streamvlm.errors",
    "EngineUnresponsiveError": "streamvlm.errors",
    "RequestOutput": "streamvlm.outputs",
    "TokenLogprobs": "streamvlm.contract.protocol",
    "SamplingParams": "streamvlm.contract.sampling",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from streamvlm.contract.config import EngineConfig
    from streamvlm.contract.protocol import TokenLogprobs
    from streamvlm.contract.sampling import SamplingParams
    from streamvlm.engine.async_engine import AsyncEngine
    from streamvlm.engine.group_health import HealthReport
    from streamvlm.engine.llm import LLM
    from streamvlm.engine.request_state import OutputDelta, Usage
    from streamvlm.metrics import EngineStats
    from streamvlm.errors import EngineDeadError, EngineOverloadedError, EngineUnresponsiveError
    from streamvlm.outputs import RequestOutput


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'streamvlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
