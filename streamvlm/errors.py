class EngineDeadError(RuntimeError):
    """A worker process died (or the engine was shut down): its requests cannot finish."""


class EngineOverloadedError(RuntimeError):
    """The engine is at its admission limit (``max_pending_requests``): try again after
    ``retry_after`` seconds. HTTP answers 429 with a Retry-After header; WebSocket an ``error``
    event with code ``overloaded`` and ``retry_after``."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnresponsiveError(EngineDeadError):
    """No worker group that could take the request is making progress (each has been silent for
    ``worker_step_timeout_s``); they may recover. HTTP answers 503, as for a dead engine."""
