"""The worker's share of a request's time to first token (for requests that ask for it): the
moments it passes on its own clock, reported once, on the first token's delta."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from streamvlm.contract.protocol import WorkerTimings


class DeviceSpan:
    """How long work queued on a device took. On CUDA the host only launches the work, so a pair of
    events brackets it on the stream and is read once the work is done; elsewhere the host runs it
    and its own clock is the measure."""

    def __init__(self, device: torch.device) -> None:
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._host = [time.monotonic(), 0.0]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, end)

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        self._host[1] = time.monotonic()

    @property
    def seconds(self) -> float:
        """Read after the work is known to be done (e.g. a later step's tokens reached the host)."""
        if self._events is None:
            return self._host[1] - self._host[0]
        start, end = self._events
        end.synchronize()
        return start.elapsed_time(end) / 1000


@dataclass(slots=True)
class WorkerTimeline:
    """Moments of one request in this worker, as time.monotonic() readings (0: not yet)."""

    received: float
    attached: float = 0.0
    scheduled: float = 0.0
    encode_start: float = 0.0
    encode_spans: list[DeviceSpan] = field(default_factory=list)
    first_token: float = 0.0
    num_prefill_steps: int = 0

    def in_step(self, now: float) -> None:
        """The request's prompt gets a chunk in the step being planned at ``now``."""
        if not self.scheduled:
            self.scheduled = now
        self.num_prefill_steps += 1

    def encoding(self, span: DeviceSpan, now: float) -> None:
        if not self.encode_start:
            self.encode_start = now
        self.encode_spans.append(span)

    def report(self, now: float) -> WorkerTimings:
        """The first token reached the host at ``now``: the record for the core."""
        self.first_token = now
        start = self.received
        return WorkerTimings(
            received=start,
            attached=self.attached - start,
            scheduled=self.scheduled - start,
            encode_start=(self.encode_start or self.scheduled) - start,
            encode_seconds=sum(span.seconds for span in self.encode_spans),
            first_token=now - start,
            num_prefill_steps=self.num_prefill_steps)
