"""Tool calls in model output: one incremental parser per template family, turning the text a
model writes into content and OpenAI-shaped tool calls.

- ``hermes`` (Hermes, Qwen2.5, Qwen3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks anywhere in the text; the text outside them is content.
- ``llama3`` (Llama 3.1/3.2 JSON tool calling): the whole output is ``{"name": ...,
  "parameters": {...}}`` (optionally after ``<|python_tag|>``; several separated by ``;``);
  output that does not start with a call is content.

Parsers are fed the text as it streams and return what may be sent now: content, and tool-call
deltas in OpenAI's streaming shape (first the call's id and name, then fragments of its
arguments). Text that might still become part of a call (a partial ``<tool_call>`` tag) is held
back until it is resolved. Whole-output parsing is the same parser fed everything at once, so
streamed and non-streamed answers agree however the text was split.

A call's ``arguments`` are the model's own text of the arguments object (not re-serialized), so
the streamed fragments join to exactly the non-streamed string.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from json.decoder import scanstring

_decoder = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ToolCall:
    """One whole tool call, as OpenAI's ``message.tool_calls[i]`` describes it."""

    id: str
    name: str
    arguments: str   # JSON text of the arguments object


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call: the first piece of each call has its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedText:
    """What a piece of model output turned into: content text and tool-call deltas."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedText) -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


@dataclass
class _ObjectScan:
    """The top-level fields of a possibly unfinished JSON object: for each key, where its value
    starts and, once complete, where it ends and what it is."""

    values: dict[str, tuple[int, int | None, object]]
    end: int | None   # just past the closing brace, once the object is complete
    invalid: bool     # the text cannot be the start of a JSON object


def _scan_object(text: str) -> _ObjectScan:
    values: dict[str, tuple[int, int | None, object]] = {}
    pos = _skip_whitespace(text, 0)
    if pos == len(text):
        return _ObjectScan(values, None, False)
    if text[pos] != "{":
        return _ObjectScan(values, None, True)
    pos = _skip_whitespace(text, pos + 1)
    while pos < len(text):
        if text[pos] == "}" and not values:
            return _ObjectScan(values, pos + 1, False)
        if text[pos] != '"':
            return _ObjectScan(values, None, True)
        try:
            key, pos = scanstring(text, pos + 1)
        except ValueError:
            return _ObjectScan(values, None, False)   # the key is still arriving
        pos = _skip_whitespace(text, pos)
        if pos == len(text):
            break
        if text[pos] != ":":
            return _ObjectScan(values, None, True)
        start = _skip_whitespace(text, pos + 1)
        try:
            value, end = _decoder.raw_decode(text, start)
        except ValueError:
            # Unfinished (or not JSON: the whole object's final parse decides). Either way all
            # the text from ``start`` belongs to this value so far.
            values[key] = (start, None, None)
            break
        if end == len(text) and not isinstance(value, (dict, list, str)):
            values[key] = (start, None, None)   # a number or literal may go on
            break
        values[key] = (start, end, value)
        pos = _skip_whitespace(text, end)
        if pos == len(text):
            break
        if text[pos] == "}":
            return _ObjectScan(values, pos + 1, False)
        if text[pos] != ",":
            return _ObjectScan(values, None, True)
        pos = _skip_whitespace(text, pos + 1)
    return _ObjectScan(values, None, False)


class _CallBuilder:
    """One tool call being streamed: given the call object's text so far, says what of it is
    new (its name once known, then the arguments' text as it grows)."""

    def __init__(self, index: int, discard: bool) -> None:
        self.index = index
        self.discard = discard   # beyond the calls wanted (parallel_tool_calls false): dropped
        self.id = new_call_id()
        self.name: str | None = None
        self.arguments_sent = ""

    @property
    def started(self) -> bool:
        return self.name is not None

    def update(self, text: str) -> list[ToolCallDelta]:
        scan = _scan_object(text)
        deltas: list[ToolCallDelta] = []
        if self.name is None:
            name = scan.values.get("name")
            if name is None or name[1] is None or not isinstance(name[2], str):
                return deltas
            self.name = name[2]
            deltas.append(ToolCallDelta(self.index, self.id, self.name))
        arguments = next((scan.values[k] for k in _ARGUMENT_KEYS if k in scan.values), None)
        if arguments is not None:
            start, end, _ = arguments
            deltas.extend(self._arguments_up_to(text[start:end]))
        return [] if self.discard else deltas

    def finish(self, text: str) -> list[ToolCallDelta] | None:
        """The rest of the call once its text is whole; None when the text is no tool call (and
        nothing of it was sent)."""
        try:
            call = json.loads(text)
        except ValueError:
            call = None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return None if self.name is None else []
        deltas = self.update(text)
        scan = _scan_object(text)
        arguments = next((scan.values[k] for k in _ARGUMENT_KEYS if k in scan.values), None)
        if arguments is None:
            deltas.extend(self._arguments_up_to("{}"))
        return [] if self.discard else deltas

    def _arguments_up_to(self, text: str) -> list[ToolCallDelta]:
        if not text.startswith(self.arguments_sent) or len(text) == len(self.arguments_sent):
            return []
        fragment = text[len(self.arguments_sent):]
        self.arguments_sent = text
        return [ToolCallDelta(self.index, arguments=fragment)]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ToolCallParser(ABC):
    """Incremental parser of one output: ``feed`` each new piece of text, then ``finish``."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.num_calls = 0

    def _new_call(self) -> _CallBuilder:
        return _CallBuilder(self.num_calls, self.max_calls is not None and self.num_calls >= self.max_calls)

    def _keep(self, call: _CallBuilder) -> None:
        if not call.discard:
            self.num_calls += 1

    @abstractmethod
    def feed(self, text: str) -> ParsedText: ...

    @abstractmethod
    def finish(self) -> ParsedText: ...

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole output: its content (None when it only holds tool calls) and its calls."""
        parsed = self.feed(text)
        parsed.extend(self.finish())
        calls = join_tool_call_deltas(parsed.tool_calls)
        return (parsed.content if parsed.content or not calls else None), calls


def join_tool_call_deltas(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta.index not in calls:
            calls[delta.index] = ToolCall(delta.id or "", delta.name or "", "")
        calls[delta.index].arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


class HermesToolCallParser(ToolCallParser):
    """``<tool_call>`` JSON ``</tool_call>`` blocks among content. Whitespace between content and
    a call is the template's layout, not content: it is dropped."""

    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._buffer = ""            # text not yet resolved
        self._call: _CallBuilder | None = None
        self._layout = ""            # the whitespace before the current call
        self._after_call = False     # no content since the last call: leading whitespace is layout

    def feed(self, text: str) -> ParsedText:
        self._buffer += text
        out = ParsedText()
        while True:
            if self._call is None:
                at = self._buffer.find(self.START)
                if at < 0:
                    held = _partial_suffix(self._buffer, self.START)
                    ready = self._buffer[:len(self._buffer) - held]
                    ready_end = len(ready.rstrip(" \t\n\r"))
                    out.content += self._content(ready[:ready_end])
                    self._buffer = self._buffer[ready_end:]
                    return out
                before = self._buffer[:at]
                content = before.rstrip(" \t\n\r")
                out.content += self._content(content)
                self._layout = before[len(content):]
                self._buffer = self._buffer[at + len(self.START):]
                self._call = self._new_call()
            end = self._buffer.find(self.END)
            if end < 0:
                held = _partial_suffix(self._buffer, self.END)
                out.tool_calls.extend(self._call.update(self._buffer[:len(self._buffer) - held]))
                return out
            out.extend(self._end_call(self._buffer[:end], self.START + self._buffer[:end] + self.END))
            self._buffer = self._buffer[end + len(self.END):]

    def finish(self) -> ParsedText:
        if self._call is not None:
            out = self._end_call(self._buffer, self.START + self._buffer)
        else:
            out = ParsedText(self._content(self._buffer))
        self._buffer = ""
        return out

    def _end_call(self, body: str, raw: str) -> ParsedText:
        call, self._call = self._call, None
        deltas = call.finish(body)
        if deltas is None:   # not a call after all: its text is content
            return ParsedText(self._content(self._layout + raw))
        self._keep(call)
        self._after_call = True
        return ParsedText(tool_calls=deltas)

    def _content(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip(" \t\n\r")
            self._after_call = not text
        return text


class Llama3JsonToolCallParser(ToolCallParser):
    """Llama 3's JSON tool calls: the output is ``{"name": ..., "parameters": {...}}``, maybe
    after ``<|python_tag|>`` and maybe several joined by ``;``; anything else is content."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._buffer = ""
        self._state = "start"   # start | call | between | content
        self._call: _CallBuilder | None = None

    def feed(self, text: str) -> ParsedText:
        self._buffer += text
        out = ParsedText()
        while True:
            if self._state == "content":
                out.content += self._buffer
                self._buffer = ""
                return out
            if self._state == "start":
                rest = self._buffer.lstrip(" \t\n\r")
                if not rest or (self.PYTHON_TAG.startswith(rest) and rest != self.PYTHON_TAG):
                    return out
                if rest.startswith(self.PYTHON_TAG):
                    rest = rest[len(self.PYTHON_TAG):].lstrip(" \t\n\r")
                    if not rest:
                        return out
                self._state = "call" if rest.startswith("{") else "content"
                if self._state == "call":
                    self._buffer = rest
                    self._call = self._new_call()
                continue
            if self._state == "between":
                rest = self._buffer.lstrip(" \t\n\r")
                if not rest:
                    return out
                if rest.startswith(";"):
                    rest = rest[1:].lstrip(" \t\n\r")
                    if not rest:
                        return out
                    if rest.startswith("{"):
                        self._buffer, self._state, self._call = rest, "call", self._new_call()
                        continue
                self._buffer, self._state = rest, "content"
                continue
            scan = _scan_object(self._buffer)
            if scan.end is None and not scan.invalid:
                out.tool_calls.extend(self._call.update(self._buffer))
                return out
            end = scan.end if scan.end is not None else len(self._buffer)
            deltas = self._call.finish(self._buffer[:end])
            if deltas is None:
                self._state = "content"   # not a call: the output is plain text
                continue
            self._keep(self._call)
            out.tool_calls.extend(deltas)
            self._buffer, self._state, self._call = self._buffer[end:], "between", None

    def finish(self) -> ParsedText:
        out = ParsedText()
        if self._state == "call":
            deltas = self._call.finish(self._buffer)
            if deltas is None:
                out.content = self._buffer
            else:
                out.tool_calls = deltas
        elif self._state == "start" or self._state == "content":
            out.content = self._buffer
        self._buffer = ""
        return out


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolCallParser,
    "llama3": Llama3JsonToolCallParser,
}
