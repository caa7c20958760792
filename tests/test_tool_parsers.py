"""Tool-call parsers (hermes, llama3) on fixed texts, however the text is split into stream
pieces; and the plan a request's tools make (formats, grammars, refusals)."""

from __future__ import annotations

import json

import pytest

from streamvlm.gateway.common import RequestError
from streamvlm.gateway.openai_schemas import NamedToolChoice, ToolDefinition
from streamvlm.gateway.tool_parsers import (HermesToolCallParser, Llama3JsonToolCallParser, ParsedText,
                                            ToolCallParser, join_tool_call_deltas)
from streamvlm.gateway.tools import (FORMATS, MAX_TOOL_SCHEMA_DEPTH, closed_objects, format_for_template,
                                     plan_tools)
from tests.tool_templates import HERMES_TEMPLATE, LLAMA3_TEMPLATE

import msgspec

HERMES_TEXTS = [
    # (model output, expected content, expected [(name, arguments)])
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": 12}}\n'
     '</tool_call>\n<tool_call>\n{"arguments": {"x": [1, {"y": "}"}]}, "name": "f"}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris", "n": 12}'), ("f", '{"x": [1, {"y": "}"}]}')]),
    ("no calls here < tool <tool_ and <tool_call", "no calls here < tool <tool_ and <tool_call", []),
    ("plain text\n\n", "plain text\n\n", []),
    ('<tool_call>{"name":"a","arguments":{}}</tool_call>', None, [("a", "{}")]),
    ('<tool_call>{"name": "a"}</tool_call>', None, [("a", "{}")]),
    ('x <tool_call>not json</tool_call> y', "x <tool_call>not json</tool_call> y", []),
    ('before <tool_call>{"name": "f", "arguments": {"s": "<tool_call>"}}</tool_call>\n\nafter',
     "beforeafter", [("f", '{"s": "<tool_call>"}')]),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1', None, [("f", '{"a": 1')]),   # cut by length
    ('<tool_call>\n{"name": "f", "arguments": {"q": "caf\\u00e9 \\"x\\""}}\n</tool_call>', None,
     [("f", '{"q": "caf\\u00e9 \\"x\\""}')]),
    ('<tool_call>{"name": "f", "arguments": {"n": -1.5e3}}</tool_call>', None, [("f", '{"n": -1.5e3}')]),
]

LLAMA3_TEXTS = [
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "f", "parameters": {"a": 1.5}}', None, [("get_weather", '{"city": "Paris"}'), ("f", '{"a": 1.5}')]),
    ('  {"name": "f", "parameters": {"a": [1, 2]}}  ', None, [("f", '{"a": [1, 2]}')]),
    ('{"name": "f", "arguments": {}}', None, [("f", "{}")]),
    ('{"a": 1} is JSON, not a call', '{"a": 1} is JSON, not a call', []),
    ("Hello there, { not a call", "Hello there, { not a call", []),
    ("<|python", "<|python", []),
    ('{"name": "f", "parameters": {"a": 1}} and then text', "and then text", [("f", '{"a": 1}')]),
]


def _joined(parsed: ParsedText) -> tuple[str | None, list[tuple[str, str]]]:
    calls = join_tool_call_deltas(parsed.tool_calls)
    content = parsed.content if parsed.content or not calls else None
    return content, [(call.name, call.arguments) for call in calls]


def _streamed(parser: ToolCallParser, pieces: list[str]) -> ParsedText:
    out = ParsedText()
    for piece in pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.finish())
    return out


@pytest.mark.parametrize("parser_class, texts", [(HermesToolCallParser, HERMES_TEXTS),
                                                 (Llama3JsonToolCallParser, LLAMA3_TEXTS)])
def test_whole_output(parser_class, texts):
    for text, content, calls in texts:
        got_content, got_calls = parser_class().parse(text)
        assert (got_content, [(c.name, c.arguments) for c in got_calls]) == (content, calls), text
        assert all(c.id.startswith("call_") for c in got_calls)
        assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("parser_class, texts", [(HermesToolCallParser, HERMES_TEXTS),
                                                 (Llama3JsonToolCallParser, LLAMA3_TEXTS)])
def test_streaming_split_anywhere_gives_the_whole_output_result(parser_class, texts):
    for text, content, calls in texts:
        expected = (content, calls)
        for cut in range(len(text) + 1):
            assert _joined(_streamed(parser_class(), [text[:cut], text[cut:]])) == expected, (text, cut)
        for second in range(0, len(text) + 1, 3):
            for first in range(0, second + 1, 5):
                pieces = [text[:first], text[first:second], text[second:]]
                assert _joined(_streamed(parser_class(), pieces)) == expected, (text, pieces)
        assert _joined(_streamed(parser_class(), list(text))) == expected, text


def test_streamed_deltas_have_openai_order():
    """Each call's first delta carries its id and name; its arguments come after, never before;
    nothing of a tag is ever sent as content."""
    text = HERMES_TEXTS[0][0]
    parser = HermesToolCallParser()
    content = ""
    seen: dict[int, str] = {}
    for ch in text:
        parsed = parser.feed(ch)
        content += parsed.content
        for delta in parsed.tool_calls:
            if delta.index not in seen:
                assert delta.id is not None and delta.name is not None
                seen[delta.index] = ""
            else:
                assert delta.id is None and delta.name is None and delta.arguments
            seen[delta.index] += delta.arguments
        assert "<" not in content
    assert parser.finish() == ParsedText()
    assert content == "Let me check."
    assert [json.loads(a) for a in seen.values()] == [{"city": "Paris", "n": 12}, {"x": [1, {"y": "}"}]}]


def test_max_calls_drops_later_calls():
    text = ('<tool_call>{"name":"a","arguments":{}}</tool_call>\n'
            '<tool_call>{"name":"b","arguments":{}}</tool_call>')
    content, calls = HermesToolCallParser(max_calls=1).parse(text)
    assert content is None and [c.name for c in calls] == ["a"]
    content, calls = Llama3JsonToolCallParser(max_calls=1).parse('{"name":"a","parameters":{}};{"name":"b","parameters":{}}')
    assert [c.name for c in calls] == ["a"]


def test_format_from_template():
    assert format_for_template(HERMES_TEMPLATE) is FORMATS["hermes"]
    assert format_for_template(LLAMA3_TEMPLATE) is FORMATS["llama3"]
    assert format_for_template({"default": "x", "tool_use": HERMES_TEMPLATE}) is FORMATS["hermes"]
    assert format_for_template("{{ messages }}") is None
    assert format_for_template(None) is None


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _tools(*functions: dict) -> list[ToolDefinition]:
    return msgspec.convert([{"type": "function", "function": f} for f in functions], list[ToolDefinition])


def _named(name: str) -> NamedToolChoice:
    return msgspec.convert({"type": "function", "function": {"name": name}}, NamedToolChoice)


def test_plan_auto_none_required_named():
    tools = _tools({"name": "get_weather", "parameters": WEATHER}, {"name": "now"})
    auto = plan_tools(tools, None, True, "auto", HERMES_TEMPLATE)
    assert auto.grammar is None and auto.format is FORMATS["hermes"] and auto.max_calls is None
    assert auto.template_tools[1] == {"type": "function", "function": {"name": "now"}}
    none = plan_tools(tools, "none", True, "auto", HERMES_TEMPLATE)
    assert none.template_tools is None and none.parser() is None
    required = plan_tools(tools, "required", False, "auto", HERMES_TEMPLATE)
    assert required.max_calls == 1 and "anyOf" in required.grammar and '"now"' in required.grammar
    named = plan_tools(tools, _named("now"), True, "llama3", HERMES_TEMPLATE)
    assert named.format is FORMATS["llama3"] and named.max_calls == 1
    assert '"parameters"' in named.grammar and "get_weather" not in named.grammar


def test_forced_calls_close_objects():
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"},
                                               "b": {"type": "array", "items": {"type": "object", "properties": {}}},
                                               "c": {"type": "object", "additionalProperties": {"type": "integer"}}},
              "$defs": {"A": {"anyOf": [{"type": "object", "properties": {"x": {"type": "string"}}},
                                        {"type": "null"}]}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] == {"type": "integer"}   # said: kept
    assert closed["$defs"]["A"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema   # the request's own schema is left as it was
    # In the grammar: the tool's schema as given becomes closed in the forced call.
    tools = _tools({"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}})
    grammar = plan_tools(tools, "required", False, "auto", HERMES_TEMPLATE).grammar
    call_schema, _ = json.JSONDecoder().raw_decode(grammar, grammar.index("%json ") + len("%json "))
    assert call_schema["properties"]["arguments"]["additionalProperties"] is False


def test_plan_refusals():
    tools = _tools({"name": "get_weather", "parameters": WEATHER})
    cases = [
        (lambda: plan_tools(None, "required", True, "auto", HERMES_TEMPLATE), "tool_choice needs tools"),
        (lambda: plan_tools(tools, _named("nope"), True, "auto", HERMES_TEMPLATE), "'nope'"),
        (lambda: plan_tools(tools, "auto", True, "auto", "{{ messages }}"), "--tool-call-parser"),
        (lambda: plan_tools(_tools({"name": "a"}, {"name": "a"}), "auto", True, "auto", HERMES_TEMPLATE),
         "given twice"),
        (lambda: plan_tools(_tools({"name": "a", "parameters": {"type": "string"}}), "auto", True, "auto",
                            HERMES_TEMPLATE), "type 'object'"),
        (lambda: plan_tools(_tools({"name": "a", "parameters": {"type": "object", "properties": {
            "x": {"type": "no-such-type"}}}}), "auto", True, "auto", HERMES_TEMPLATE), "no-such-type"),
        (lambda: plan_tools(_tools(*({"name": f"f{i}"} for i in range(129))), "auto", True, "auto",
                            HERMES_TEMPLATE), "at most 128"),
    ]
    deep: dict = {"type": "object"}
    for _ in range(MAX_TOOL_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"x": deep}}
    cases.append((lambda: plan_tools(_tools({"name": "a", "parameters": deep}), "auto", True, "auto",
                                     HERMES_TEMPLATE), "nested deeper"))
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(700)}}
    cases.append((lambda: plan_tools(_tools({"name": "a", "parameters": big}), "auto", True, "auto",
                                     HERMES_TEMPLATE), "characters"))
    for call, message in cases:
        with pytest.raises(RequestError, match=message):
            call()
    # tool_choice "none" without tools is allowed: it asks for nothing.
    assert plan_tools(None, "none", True, "auto", HERMES_TEMPLATE).template_tools is None
