"""streamvlm: a streaming inference engine for vision-language models and LLMs."""

from streamvlm.config import EngineConfig
from streamvlm.engine.llm import LLM
from streamvlm.outputs import RequestOutput
from streamvlm.protocol import TokenLogprobs
from streamvlm.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "TokenLogprobs"]
__version__ = "0.1.0"
