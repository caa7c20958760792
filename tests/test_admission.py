"""Admission turns (gateway/admission.py): arrival order, room per turn, other work between turns."""

from __future__ import annotations

import asyncio

from streamvlm.gateway.admission import AdmissionGate, AdmissionTurns, turn_taken


class FakeClock:
    """The turns' clock, advanced only by the requests' admission work: timings that a busy machine
    cannot stretch."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def busy(self, seconds: float) -> None:
        self.now += seconds


def test_a_lone_request_starts_without_yielding() -> None:
    async def main() -> None:
        turns = AdmissionTurns(slice_s=0.01)
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, "other")
        await turns.turn()
        assert ran == []   # nothing else ran in between: no turn of the loop was given up
        assert turns.waiting == 0
    asyncio.run(main())


def test_a_burst_starts_in_arrival_order_with_other_work_between_turns() -> None:
    async def main() -> None:
        clock = FakeClock()
        turns = AdmissionTurns(slice_s=0.002, clock=clock)
        log: list[str] = []

        async def request(i: int) -> None:
            await turns.turn()
            log.append(f"start {i}")
            clock.busy(0.001)   # admission work: two fit a turn's slice
            # What the output loop would do once this request's first token is in.
            asyncio.get_running_loop().call_soon(log.append, f"output {i}")

        await asyncio.gather(*(request(i) for i in range(8)))
        starts = [entry for entry in log if entry.startswith("start")]
        assert starts == [f"start {i}" for i in range(8)]
        # The first request's output went out before the last request started.
        assert log.index("output 0") < log.index("start 7")
        assert turns.waiting == 0
    asyncio.run(main())


def test_the_cost_estimate_follows_the_requests() -> None:
    async def main() -> None:
        clock = FakeClock()
        turns = AdmissionTurns(slice_s=0.05, clock=clock)

        async def request() -> None:
            await turns.turn()
            clock.busy(0.002)

        for _ in range(3):
            await asyncio.gather(*(request() for _ in range(12)))
        assert 0.0019 < turns.cost_s < 0.0021
    asyncio.run(main())


def test_a_request_cancelled_while_waiting_gives_up_its_place() -> None:
    async def main() -> None:
        turns = AdmissionTurns(slice_s=0.0)   # one request a turn
        started: list[int] = []

        async def request(i: int) -> None:
            await turns.turn()
            started.append(i)

        tasks = [asyncio.ensure_future(request(i)) for i in range(4)]
        await asyncio.sleep(0)   # every request has arrived: 0 started, 1-3 wait
        assert started == [0] and turns.waiting == 3
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert started == [0, 2, 3]
        assert tasks[1].cancelled()
        assert turns.waiting == 0
    asyncio.run(main())


def test_the_gate_gives_generation_requests_their_turn_before_the_app_runs() -> None:
    async def main() -> None:
        turns = AdmissionTurns(slice_s=0.0)   # one request a turn
        reached: list[tuple[str, bool]] = []

        async def app(scope, receive, send) -> None:
            reached.append((scope.get("path", scope["type"]), turn_taken(scope)))

        gate = AdmissionGate(app, turns, {"/v1/chat/completions"})
        tasks = [asyncio.ensure_future(gate({"type": "http", "method": "POST",
                                             "path": "/v1/chat/completions"}, None, None))
                 for _ in range(3)]
        await asyncio.sleep(0)
        # The first has its turn; the others wait outside the app.
        assert reached == [("/v1/chat/completions", True)] and turns.waiting == 2
        await gate({"type": "http", "method": "GET", "path": "/health"}, None, None)
        await gate({"type": "lifespan"}, None, None)
        assert reached[1:] == [("/health", False), ("lifespan", False)]   # no turn for them
        await asyncio.gather(*tasks)
        assert reached[3:] == [("/v1/chat/completions", True)] * 2 and turns.waiting == 0
    asyncio.run(main())


def test_what_a_turn_wakes_as_it_ends_runs_before_the_next_turn() -> None:
    """Step outputs folded as a turn ends wake the streams of the requests admitted before: their
    first events go out before the next turn's admissions, not after them."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        turns = AdmissionTurns(slice_s=0.0)   # one request a turn
        order: list[str] = []
        first_token = loop.create_future()

        async def stream() -> None:
            await first_token
            order.append("first event")

        async def request(i: int) -> None:
            await turns.turn()
            order.append(f"admitted {i}")
            if i == 0:   # its first token, folded as the turn ends
                loop.call_soon(first_token.set_result, None)

        tasks = [asyncio.ensure_future(stream()), *(asyncio.ensure_future(request(i)) for i in range(2))]
        await asyncio.gather(*tasks)
        assert order == ["admitted 0", "first event", "admitted 1"]
    asyncio.run(main())
