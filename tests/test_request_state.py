"""RequestState: folding worker deltas into a request's output, with stop strings."""

from __future__ import annotations

import msgspec

from streamvlm.engine.request_state import RequestState
from streamvlm.contract.protocol import RequestDelta, TokenLogprobs
from streamvlm.contract.sampling import SamplingParams

EOS = 26


class CharTokenizer:
    """Token i is the letter chr(ord('a') + i); EOS is special (dropped when skipping)."""

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return "".join("<eos>" if t == EOS else chr(ord("a") + t) for t in token_ids
                       if not (skip_special_tokens and t == EOS))


def ids(text: str) -> list[int]:
    return [ord(ch) - ord("a") for ch in text]


def logprobs(n: int) -> list[TokenLogprobs]:
    return [TokenLogprobs(-float(i)) for i in range(n)]


def make_state(**params) -> RequestState:
    return RequestState("r", ids("zz"), SamplingParams(**params), CharTokenizer())


def test_stop_string_inside_one_delta_truncates_tokens_and_logprobs():
    state = make_state(stop=["cd"], logprobs=True)
    out = state.apply(RequestDelta("r", ids("abcdef"), logprobs(6)))
    assert out.token_ids == ids("abcd")   # up to the token that completed "cd"
    assert out.text == "ab" and out.finish_reason == "stop"
    assert [e.logprob for e in out.logprobs] == [0.0, -1.0, -2.0, -3.0]
    assert state.finished and state.stopped_by_string
    result = state.output
    assert result.token_ids == ids("abcd") and result.text == "ab"
    assert len(result.logprobs) == 4 and result.finish_reason == "stop"


def test_stop_string_across_deltas_then_late_deltas_are_ignored():
    state = make_state(stop=["cd"])
    texts = [state.apply(RequestDelta("r", [t])).text for t in ids("abc")]
    assert texts == ["a", "b", ""]   # "c" may start the stop string: held back
    assert not state.finished
    last = state.apply(RequestDelta("r", ids("d")))
    assert last.text == "" and last.token_ids == ids("d") and last.finish_reason == "stop"
    # The worker did not know about the stop string: it sends more tokens, then the abort
    # that the engine asked for. Both are late echoes.
    assert state.apply(RequestDelta("r", ids("e"))) is None
    assert state.apply(RequestDelta("r", [], finish_reason="abort")) is None
    assert state.apply(RequestDelta("r", ids("f"), finish_reason="length")) is None
    result = state.output
    assert result.token_ids == ids("abcd") and result.text == "ab"
    assert result.finish_reason == "stop" and result.logprobs is None


def test_stop_string_completed_by_the_finishing_token():
    # The worker's own finish (max_tokens) arrives with the token that completes the stop
    # string: the stop string wins, and it is not in the text.
    state = make_state(stop=["bc"])
    state.apply(RequestDelta("r", ids("ab")))
    out = state.apply(RequestDelta("r", ids("c"), finish_reason="length"))
    assert out.finish_reason == "stop" and state.output.text == "a"
    assert state.output.token_ids == ids("abc")


def test_held_text_is_flushed_when_the_request_ends_without_a_stop():
    state = make_state(stop=["cd"])
    state.apply(RequestDelta("r", ids("ab")))
    out = state.apply(RequestDelta("r", ids("c"), finish_reason="length"))
    assert out.text == "c" and out.finish_reason == "length"
    assert state.output.text == "abc" and not state.stopped_by_string


def test_abort_and_eos():
    state = make_state()
    state.apply(RequestDelta("r", ids("ab")))
    assert state.apply(RequestDelta("r", [], finish_reason="abort")).finish_reason == "abort"
    assert state.output.text == "ab" and state.output.finish_reason == "abort"
    assert state.apply(RequestDelta("r", ids("c"))) is None

    state = make_state()
    out = state.apply(RequestDelta("r", ids("ab") + [EOS], finish_reason="stop"))
    assert out.token_ids == ids("ab") + [EOS] and out.text == "ab"
    assert state.output.finish_reason == "stop" and not state.stopped_by_string


def test_error_delta():
    state = make_state()
    out = state.apply(RequestDelta("r", [], finish_reason="error", error="prompt is empty"))
    assert out.error == "prompt is empty" and state.output.error == "prompt is empty"
    assert state.finished and state.output.finish_reason == "error"


def test_deltas_out_of_order_are_folded_in_output_order():
    """A prefill/decode request streams from two groups: the decode group's second token can
    reach the core before the prefill group's first."""
    state = make_state(logprobs=True)
    assert state.apply(RequestDelta("r", ids("b"), logprobs(1), output_index=1)) is None
    assert state.apply(RequestDelta("r", ids("d"), logprobs(1), output_index=3)) is None
    assert state.output.token_ids == []
    out = state.apply(RequestDelta("r", ids("a"), logprobs(1), output_index=0))
    assert out.token_ids == ids("ab") and out.text == "ab" and len(out.logprobs) == 2
    # Tokens folded in already are dropped; a delta overlapping them keeps only its new ones.
    assert state.apply(RequestDelta("r", ids("a"), logprobs(1), output_index=0)) is None
    out = state.apply(RequestDelta("r", ids("bc"), logprobs(2), output_index=1))
    assert out.token_ids == ids("cd") and out.text == "cd" and len(out.logprobs) == 2
    last = state.apply(RequestDelta("r", ids("e"), logprobs(1), finish_reason="length",
                                    output_index=4))
    assert last.finish_reason == "length" and last.usage.completion_tokens == 5
    result = state.output
    assert result.token_ids == ids("abcde") and result.text == "abcde"
    assert len(result.logprobs) == 5 and result.finish_reason == "length"


def test_a_held_final_delta_ends_the_request_once_its_turn_comes():
    state = make_state(stop=["c"])
    assert state.apply(RequestDelta("r", ids("d"), finish_reason="length", output_index=3)) is None
    assert state.apply(RequestDelta("r", ids("bc"), output_index=1)) is None
    assert not state.finished
    out = state.apply(RequestDelta("r", ids("a"), output_index=0))
    # The stop string ends it at "c": the held "d" and its finish never show.
    assert out.token_ids == ids("abc") and out.text == "ab" and out.finish_reason == "stop"
    assert state.apply(RequestDelta("r", ids("d"), finish_reason="length", output_index=3)) is None
    assert state.output.token_ids == ids("abc") and state.output.finish_reason == "stop"


def test_an_error_without_tokens_ends_a_request_that_waits_for_earlier_tokens():
    state = make_state()
    assert state.apply(RequestDelta("r", ids("b"), output_index=1)) is None
    out = state.apply(RequestDelta("r", [], finish_reason="error", error="KV receive failed"))
    assert out.finish_reason == "error" and state.finished
    assert state.apply(RequestDelta("r", ids("a"), output_index=0)) is None
    assert state.output.token_ids == []


def test_timings_of_a_worker_on_another_host_split_the_round_trip() -> None:
    """A remote worker's clock is not the core's: its intervals are placed from the moment the
    request was sent, with the round trip they leave unexplained split evenly both ways."""
    from streamvlm.contract.protocol import WorkerTimings
    from streamvlm.engine.request_timing import CoreStamps, RequestTimings

    core = CoreStamps(arrival=100.0, prepared=100.25, sent=100.5)
    worker = WorkerTimings(received=7.0, attached=0.125, scheduled=0.25, encode_start=0.25,
                           encode_seconds=0.5, first_token=1.0, num_prefill_steps=2)
    remote = RequestTimings.place(core, worker, delivered=102.0, clock_shared=False)
    assert remote.intervals() == {"preprocess": 0.25, "core_wait": 0.25, "to_worker": 0.25,
                                  "worker_prepare": 0.125, "step_wait": 0.125, "encode": 0.5,
                                  "prefill": 0.25, "way_back": 0.25}
    assert sum(remote.intervals().values()) == remote.ttft == 2.0
    local = RequestTimings.place(core, msgspec.structs.replace(worker, received=100.75),
                                 delivered=102.0, clock_shared=True)
    assert (local.to_worker, local.way_back) == (0.25, 0.25)
    local = RequestTimings.place(core, msgspec.structs.replace(worker, received=100.625),
                                 delivered=102.0, clock_shared=True)
    assert (local.to_worker, local.way_back) == (0.125, 0.375)
