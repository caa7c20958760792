from __future__ import annotations

from dataclasses import dataclass, field

from streamvlm.contract.protocol import FinishReason, PromptLogprobs, TokenLogprobs
from streamvlm.engine.request_timing import RequestTimings


@dataclass
class RequestOutput:
    """The result of one request. ``logprobs`` has one entry per output token when asked;
    ``prompt_logprobs`` (params.prompt_logprobs) covers prompt tokens 1.. (the first has none)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None
    timings: RequestTimings | None = None   # requests made with collect_timings=True
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
