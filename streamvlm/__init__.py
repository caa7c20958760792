"""streamvlm: a streaming inference engine for vision-language models and LLMs."""

from streamvlm.config import EngineConfig
from streamvlm.engine.async_engine import AsyncEngine, EngineStats, HealthReport
from streamvlm.engine.llm import LLM
from streamvlm.engine.request_state import OutputDelta, Usage
from streamvlm.errors import EngineDeadError, EngineOverloadedError, EngineUnresponsiveError
from streamvlm.outputs import RequestOutput
from streamvlm.protocol import TokenLogprobs
from streamvlm.sampling import SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "EngineDeadError", "EngineOverloadedError", "EngineStats",
           "EngineUnresponsiveError", "HealthReport", "OutputDelta", "RequestOutput", "SamplingParams",
           "TokenLogprobs", "Usage"]
__version__ = "0.1.0"
