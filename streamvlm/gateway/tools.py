"""A chat request's tools turned into what the engine and the answer need: the tool definitions
the chat template gets, the grammar that enforces ``tool_choice`` "required" or a named function,
and the parser that reads tool calls out of the output.

The tool-call syntax is a property of the model's chat template: ``--tool-call-parser`` names it
(``hermes``, ``llama3``) or, with ``auto``, it is recognized in the template text. A forced choice
is enforced with a grammar in that same syntax whose call objects are JSON schemas (llguidance's
``%json``): the tool name is a constant and the arguments follow the function's ``parameters``
schema, so the output always parses into calls whose arguments validate.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import msgspec

from streamvlm.contract.sampling import MAX_GRAMMAR_CHARS, StructuredOutputs
from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.structured_output import compile_structured_outputs
from streamvlm.gateway.common import RequestError
from streamvlm.gateway.openai_schemas import NamedToolChoice, ToolChoice, ToolDefinition
from streamvlm.gateway.tool_parsers import PARSERS, ToolCall, ToolCallDelta, ToolCallParser
from streamvlm.inputs.chat import MAX_TOOLS

# A tool's parameters schema: nesting beyond this is refused (the body's own depth bound is
# looser, and every level is grammar the worker walks).
MAX_TOOL_SCHEMA_DEPTH = 32
# Calls one forced answer may hold when parallel_tool_calls is on.
MAX_FORCED_PARALLEL_CALLS = 16
# Compact JSON in forced calls: a model cannot wander through unbounded whitespace.
_COMPACT_JSON = {"whitespace_flexible": False}


@dataclass(frozen=True)
class ToolFormat:
    """One template family's tool-call syntax: the key its calls put the arguments under, how
    calls are framed and joined, and its parser."""

    name: str
    arguments_key: str
    call_prefix: str
    call_suffix: str
    call_separator: str

    def parser(self, max_calls: int | None) -> ToolCallParser:
        return PARSERS[self.name](max_calls)

    def grammar(self, call_schema: dict[str, Any], max_calls: int) -> str:
        """A Lark grammar (llguidance's dialect) of 1 to ``max_calls`` calls whose objects match
        ``call_schema``."""
        call = " ".join(part for part in (_lark_string(self.call_prefix), "%json " + json.dumps(call_schema),
                                          _lark_string(self.call_suffix)) if part)
        start = "call" if max_calls == 1 else \
            f"call ({_lark_string(self.call_separator)} call){{0,{max_calls - 1}}}"
        return f"start: {start}\ncall: {call}\n"


def _lark_string(text: str) -> str:
    return json.dumps(text) if text else ""


FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", "arguments", "<tool_call>\n", "\n</tool_call>", "\n"),
    "llama3": ToolFormat("llama3", "parameters", "", "", "; "),
}


def format_for_template(template: Any) -> ToolFormat | None:
    """The tool-call format a chat template writes, recognized by its text: Hermes/Qwen
    templates mention ``<tool_call>``; Llama 3.1+ templates ``<|python_tag|>`` or their JSON
    calling instructions ({"name": ..., "parameters": ...})."""
    if isinstance(template, dict):   # named templates: any of them may be the tool one
        template = "\n".join(t for t in template.values() if isinstance(t, str))
    if not isinstance(template, str):
        return None
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return FORMATS["llama3"]
    return None


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools change: the template's ``tools``, the grammar that forces a call
    (None: the model chooses), and the parser of the output (None: output is plain content)."""

    template_tools: list[dict[str, Any]] | None
    grammar: str | None
    format: ToolFormat | None
    max_calls: int | None

    def parser(self) -> ToolCallParser | None:
        return None if self.format is None else self.format.parser(self.max_calls)


NO_TOOLS = ToolPlan(None, None, None, None)


async def plan_request_tools(engine: AsyncEngine, parser_setting: str,
                             tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None,
                             parallel_tool_calls: bool) -> ToolPlan:
    """plan_tools off the event loop (schemas are compiled), for a request to ``engine``."""
    if not tools and tool_choice in (None, "none"):
        return NO_TOOLS
    template = getattr(engine.processor.tokenizer, "chat_template", None)
    return await asyncio.get_running_loop().run_in_executor(
        None, plan_tools, tools, tool_choice, parallel_tool_calls, parser_setting, template)


def plan_tools(tools: list[ToolDefinition] | None, tool_choice: ToolChoice | None,
               parallel_tool_calls: bool, parser_setting: str,
               chat_template: Any) -> ToolPlan:
    """The plan for a request; RequestError names what is wrong with its tools or tool_choice.
    Compiles schemas (llguidance): call it off the event loop."""
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise RequestError("tool_choice needs tools: this request has none", param="tool_choice")
        return NO_TOOLS
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed",
                           param="tools")
    parameters = _checked_parameters(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        # The model is told of no tools at all: a model shown tools may write a call anyway,
        # which would come back as content.
        return NO_TOOLS
    fmt = FORMATS.get(parser_setting) if parser_setting != "auto" else format_for_template(chat_template)
    if fmt is None:
        raise RequestError("this model's chat template shows no tool-call format the server knows; "
                           "start the server with --tool-call-parser hermes or llama3", param="tools")
    template_tools = [msgspec.to_builtins(tool) for tool in tools]
    max_calls = None if parallel_tool_calls else 1
    if choice == "auto":
        return ToolPlan(template_tools, None, fmt, max_calls)
    if isinstance(choice, NamedToolChoice):
        names = [tool.function.name for tool in tools]
        if choice.function.name not in names:
            raise RequestError(f"tool_choice names the function {choice.function.name!r}, which is not "
                               f"among the tools ({', '.join(map(repr, names))})", param="tool_choice")
        # A named function is called once, as OpenAI does.
        forced = [names.index(choice.function.name)]
        max_calls = 1
    else:   # "required"
        forced = list(range(len(tools)))
    calls = [_call_schema(fmt, tools[i].function.name, closed_objects(parameters[i])) for i in forced]
    call_schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    grammar = fmt.grammar({**call_schema, "x-guidance": _COMPACT_JSON},
                          max_calls or MAX_FORCED_PARALLEL_CALLS)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise RequestError(f"the tools' parameters schemas are over {MAX_GRAMMAR_CHARS} characters "
                           f"in all, too large to enforce tool_choice", param="tools")
    return ToolPlan(template_tools, grammar, fmt, max_calls)


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists its
    properties and says nothing of others: a forced call writes the declared parameters only
    (as vLLM's default grammar backend, xgrammar, does in its strict mode). Without it a schema
    allows any extra key with any value, which a weak model wanders into."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(result.get(key), dict):
            result[key] = {name: closed_objects(s) for name, s in result[key].items()}
    for key in (*_SUBSCHEMA_LISTS, "items"):
        if key in result:
            result[key] = closed_objects(result[key])
    if ("properties" in result and "additionalProperties" not in result
            and "patternProperties" not in result):
        result["additionalProperties"] = False
    return result


def _call_schema(fmt: ToolFormat, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": name}, fmt.arguments_key: parameters},
            "required": ["name", fmt.arguments_key], "additionalProperties": False}


def _checked_parameters(tools: list[ToolDefinition]) -> list[dict[str, Any]]:
    """Each tool's parameters as an object schema, checked: unique names, bounded size and depth,
    and a schema the grammar library compiles."""
    seen: set[str] = set()
    result = []
    size = 0
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function"
        name = tool.function.name
        if name in seen:
            raise RequestError(f"{where}.name {name!r} is given twice", param="tools")
        seen.add(name)
        schema = tool.function.parameters
        if schema is None:   # OpenAI: a function without parameters takes none
            schema = {"type": "object", "properties": {}, "additionalProperties": False}
        elif schema.get("type", "object") != "object":
            raise RequestError(f"{where}.parameters must be a JSON schema of type 'object'",
                               param="tools")
        else:
            schema = {**schema, "type": "object"}
        if _depth(schema) > MAX_TOOL_SCHEMA_DEPTH:
            raise RequestError(f"{where}.parameters is nested deeper than {MAX_TOOL_SCHEMA_DEPTH} "
                               f"levels", param="tools")
        text = json.dumps(schema, separators=(",", ":"))
        size += len(text)
        if size > MAX_GRAMMAR_CHARS:
            raise RequestError(f"the tools' parameters schemas are over {MAX_GRAMMAR_CHARS} "
                               f"characters in all", param="tools")
        try:
            compile_structured_outputs(StructuredOutputs(json=text))
        except ValueError as exc:
            message = str(exc).removeprefix("structured_outputs.json ")
            raise RequestError(f"{where}.parameters {message}", param="tools") from None
        result.append(schema)
    return result


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def openai_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """``message.tool_calls`` of a whole answer."""
    return [{"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]


def openai_tool_call_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """``delta.tool_calls`` of a streamed chunk: a call's first piece carries its id, type and
    name, the next ones fragments of its arguments."""
    result = []
    for delta in deltas:
        if delta.id is not None:
            result.append({"index": delta.index, "id": delta.id, "type": "function",
                           "function": {"name": delta.name, "arguments": delta.arguments}})
        else:
            result.append({"index": delta.index, "function": {"arguments": delta.arguments}})
    return result
