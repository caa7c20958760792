class EngineDeadError(RuntimeError):
    """A worker process died (or the engine was shut down): its requests cannot finish."""
