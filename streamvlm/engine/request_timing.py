"""Where one request's time to first token went, from the engine core's stamps and the worker's
WorkerTimings, placed on the core's clock (requests streamed with ``collect_timings=True``)."""

from __future__ import annotations

from dataclasses import dataclass

from streamvlm.contract.protocol import WorkerTimings


@dataclass(slots=True)
class CoreStamps:
    """The engine core's time.monotonic() readings for one request."""

    arrival: float    # entered stream() / generate()
    prepared: float   # prompt templated and tokenized, its images decoded and preprocessed
    sent: float       # about to hand the AddRequest to the worker group's socket


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """A request's time to first token, in seconds, as consecutive intervals that add up to
    ``delivered - arrival``."""

    preprocess: float      # arrival -> prompt prepared: tokenizing, image decode and preprocessing,
                           # and the waits for their executors and the pixel budget
    core_wait: float       # -> about to hand it to the worker group: validation, routing
    to_worker: float       # -> the worker took it from its inbox: encoding and sending the
                           # message, and the waits while a step runs there
    worker_prepare: float  # -> its images are tensors, checked, M-RoPE positions made
    step_wait: float       # -> first put in a step (queueing in the worker's scheduler)
    encode: float          # vision encoder calls that ran its images (device time)
    prefill: float         # the rest until its first token is on the worker's host: prefill
                           # chunks, and the steps between them
    way_back: float        # -> the step output with that token reached the engine core
    num_prefill_steps: int
    # False: the worker runs on another host, whose clock is not ours: to_worker and way_back are
    # then each half of the round trip the worker's own intervals do not account for.
    clock_shared: bool
    arrival: float         # the core's time.monotonic()
    delivered: float

    @property
    def ttft(self) -> float:
        return self.delivered - self.arrival

    @classmethod
    def place(cls, core: CoreStamps, worker: WorkerTimings, delivered: float,
              clock_shared: bool) -> RequestTimings:
        if clock_shared:
            received = worker.received
        else:
            unaccounted = (delivered - core.sent) - worker.first_token
            received = core.sent + unaccounted / 2
        first_token = received + worker.first_token
        in_steps = worker.first_token - worker.scheduled
        encode = min(worker.encode_seconds, in_steps)
        return cls(
            preprocess=core.prepared - core.arrival,
            core_wait=core.sent - core.prepared,
            to_worker=received - core.sent,
            worker_prepare=worker.attached,
            step_wait=worker.scheduled - worker.attached,
            encode=encode,
            prefill=in_steps - encode,
            way_back=delivered - first_token,
            num_prefill_steps=worker.num_prefill_steps,
            clock_shared=clock_shared,
            arrival=core.arrival,
            delivered=delivered)

    def intervals(self) -> dict[str, float]:
        """The consecutive intervals by name, in order."""
        return {name: getattr(self, name) for name in INTERVALS}


INTERVALS = ("preprocess", "core_wait", "to_worker", "worker_prepare", "step_wait", "encode",
             "prefill", "way_back")
