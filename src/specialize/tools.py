"""Tool calling: the one tool-call format, its parser, and the checks on tools and calls.

Data, lint, training, serving and evaluation all go through this module, so a call is written,
rendered, parsed and scored one way. The format is Qwen2.5's (the Hermes function-calling form),
which vLLM's `hermes` tool parser and Qwen's own chat template read and write:

- the tools are listed in the system turn (`tools_system_text`): one JSON function per line
  inside `<tools></tools>`;
- the assistant calls a tool with `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, several blocks for parallel calls (`render_tool_calls`);
- a tool's result comes back in a user turn as `<tool_response>\\n...\\n</tool_response>`
  (`render_tool_result`); consecutive results share one turn.

specialize's own `chatml` template renders exactly this (the Jinja fragments below), and a
tokenizer whose own chat template supports tools renders through that template instead.

Messages are OpenAI's: an assistant turn carries `tool_calls` =
`[{"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}]`; a `tool`
turn carries `tool_call_id` and the result as `content`. Chat templates read `arguments` as an
object, so `template_messages` decodes it before rendering.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

# Qwen2.5-Instruct's chat template, word for word (tests/assets/templates/qwen2.5.jinja).
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")

# OpenAI's rule for function names; it also keeps a name safe to write unquoted into a call.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# OpenAI's limit on tools per request; thousands make the tool-call grammar too large to build.
MAX_TOOLS = 128


def _jinja_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal (\n, \" escapes)


# The same three renderings as Jinja, for specialize's own chatml template (templates.py): the
# installed template must render at serve time exactly what training rendered.
JINJA_TOOLS_BLOCK = ("{{- " + _jinja_literal(TOOLS_INTRO) + " }}{%- for tool in tools %}{{- '\\n' + tool | tojson }}"
                     "{%- endfor %}{{- " + _jinja_literal(TOOLS_OUTRO) + " }}")
JINJA_CALLS = ("{%- for call in message.tool_calls %}{%- if call.function is defined %}{%- set call = call.function %}"
               "{%- endif %}{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
               "{{- '<tool_call>\\n{\"name\": ' + call.name | tojson + ', \"arguments\": ' }}"
               "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}"
               "{%- endif %}{{- '}\\n</tool_call>' }}{%- endfor %}")
JINJA_RESULT = "{{- '<tool_response>\\n' + message.content + '\\n</tool_response>' }}"


def function_of(tool: dict) -> dict:
    """The function object of a tool: OpenAI's `{"type": "function", "function": {...}}` or a bare function."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def normalize_tools(tools: list[dict]) -> list[dict]:
    """Tools in OpenAI's shape (`{"type": "function", "function": {...}}`), bare functions wrapped."""
    return [tool if isinstance(tool.get("function"), dict) else {"type": "function", "function": tool}
            for tool in tools]


def tools_system_text(tools: list[dict]) -> str:
    """The block listing the tools, as the system turn carries it (after the system text and a blank line)."""
    return TOOLS_INTRO + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + TOOLS_OUTRO


def _name_and_arguments(call: dict) -> tuple[str, Any]:
    function = call["function"] if isinstance(call.get("function"), dict) else call
    arguments = function.get("arguments", function.get("parameters", {}))
    return function["name"], arguments


def render_tool_calls(calls: list[dict]) -> str:
    """The assistant text for calls (OpenAI's `{"function": {"name", "arguments"}}` or plain `{name, arguments}`;
    arguments an object or a JSON string, written as `json.dumps` writes the object; a string that is not JSON
    is written as it is), one `<tool_call>` block per call, separated by a newline."""
    blocks = []
    for call in calls:
        name, arguments = call_arguments(call)  # a JSON string is written as templates write objects
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        blocks.append(f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}'
                      f'\n{TOOL_CALL_CLOSE}')
    return "\n".join(blocks)


def render_tool_result(content: str) -> str:
    """One tool result as the user turn carries it; consecutive results are joined by a newline."""
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    """A call in OpenAI's response shape: `arguments` is a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolCallScan:
    """What a model's output holds: its text outside calls, the valid calls, and the invalid call blocks."""

    text: str
    calls: list[dict] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # call blocks that were unclosed or not a JSON call


_JSON = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


def _decode_call(value: Any, bare: bool = False) -> tuple[str, Any] | None:
    """`{"name": str, "arguments": object}` (or Llama 3.1's `"parameters"`), else None. A `bare` object (no
    `<tool_call>` around it) must have exactly those two keys, so an answer that is JSON data with a
    "name" (`{"name": "Alice", "age": 30}`) is not read as a call."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    if bare and set(value) not in ({"name", "arguments"}, {"name", "parameters"}):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str) and not bare:  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], arguments


def call_block(text: str, start: int, final: bool = True) -> tuple[int, list[tuple[str, dict]]] | None:
    """The `<tool_call>` block opening at `start`: (the index after its `</tool_call>`, its calls), with
    no calls for an invalid block; None while it is not closed.

    The body is read as JSON objects (one call each; Qwen models sometimes write several in one
    block), so a `</tool_call>` inside an argument string does not end the block. A body that is not
    JSON calls ends at the first `</tool_call>`. With `final` false (a stream that may go on), a
    body that may still become JSON is not closed yet."""
    pos, calls = start + len(TOOL_CALL_OPEN), []
    first_close = text.find(TOOL_CALL_CLOSE, pos)
    while True:
        pos = _SPACE.match(text, pos).end()
        if calls and text.startswith(TOOL_CALL_CLOSE, pos):
            return pos + len(TOOL_CALL_CLOSE), calls
        try:
            value, pos = _JSON.raw_decode(text, pos)
        except ValueError as e:
            # Broken before the first close tag: invalid whatever follows. Otherwise the JSON may
            # only be cut short (a string still open, or text not written yet).
            broken = first_close >= 0 and e.pos < first_close and not e.msg.startswith("Unterminated string")
            break
        call = _decode_call(value)
        if call is None:
            broken = True
            break
        calls.append(call)
    if first_close < 0 or not (broken or final):
        return None
    return first_close + len(TOOL_CALL_CLOSE), []


def first_call_end(text: str, final: bool = True) -> int | None:
    """The index after the first `<tool_call>` block (valid or not; see `call_block`), None while there is none."""
    start = text.find(TOOL_CALL_OPEN)
    block = call_block(text, start, final) if start >= 0 else None
    return block[0] if block else None


def scan_tool_calls(text: str, names: frozenset[str] | None = None) -> ToolCallScan:
    """Find the calls in a model's output.

    `<tool_call>...</tool_call>` blocks are read with any whitespace around the JSON (see
    `call_block`). A block that is not JSON calls, or a `<tool_call>` never closed, stays in the
    text and is listed in `invalid`. Without any block, an output that is one bare JSON object with
    exactly a name and `parameters`/`arguments` (Llama 3.1's form) is one call. With `names`, a
    call to any other name is not a call: its block stays in the text (the server cannot offer it).
    """
    calls: list[dict] = []
    invalid: list[str] = []
    kept: list[str] = []
    end = 0
    while (start := text.find(TOOL_CALL_OPEN, end)) >= 0:
        block = call_block(text, start)
        if block is None:
            break
        kept.append(text[end:start])
        if block[1] and names is not None and any(name not in names for name, _ in block[1]):
            kept.append(text[start:block[0]])
        elif block[1]:
            calls.extend(openai_call(*call) for call in block[1])
        else:
            invalid.append(text[start:block[0]])
            kept.append(text[start:block[0]])
        end = block[0]
    rest = text[end:]
    if TOOL_CALL_OPEN in rest:
        invalid.append(rest[rest.index(TOOL_CALL_OPEN):])
    kept.append(rest)
    outside = "".join(kept).strip()
    if not calls and not invalid and outside.startswith("{") and outside.endswith("}"):
        try:
            decoded = _decode_call(json.loads(outside), bare=True)
        except ValueError:
            decoded = None
        if decoded is not None and (names is None or decoded[0] in names):
            return ToolCallScan("", [openai_call(*decoded)])
    return ToolCallScan(outside, calls, invalid)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside calls, the calls in OpenAI's shape with `arguments` as a JSON string)."""
    scan = scan_tool_calls(text)
    return scan.text, scan.calls


def call_arguments(call: dict) -> tuple[str, Any]:
    """(name, decoded arguments) of a call in either shape; arguments that are not JSON stay a string."""
    name, arguments = _name_and_arguments(call)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return name, arguments


def _content_text(content: Any) -> Any:
    """OpenAI's content-part list (`[{"type": "text", "text": ...}]`) as one string; anything else as is."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as chat templates read them: `developer` as `system`, content-part lists as text,
    a null content as empty text, and tool-call arguments decoded to objects (Qwen's and Llama's templates
    write them with `tojson`). Keys a template does not know (`weight`, `name`) are left to the caller."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        message["content"] = _content_text(message.get("content"))
        if message["content"] is None:
            message["content"] = ""
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                name, arguments = call_arguments(call)
                calls.append({**{k: v for k, v in call.items() if k != "function"}, "type": "function",
                              "function": {"name": name, "arguments": arguments}})
            message["tool_calls"] = calls
        elif "tool_calls" in message:
            del message["tool_calls"]  # an empty list or null: templates test `is defined` / `in message`
        out.append(message)
    return out


def check_tools(tools: Any) -> list[str]:
    """What is wrong with a `tools` list (empty when nothing): not a list, a tool that is not an object,
    a missing or bad name, a duplicate name, parameters that are not a JSON-schema object, a `$ref`
    that does not resolve, more than MAX_TOOLS tools."""
    if not isinstance(tools, list):
        return [f"expected a list of tools, got {type(tools).__name__}"]
    if len(tools) > MAX_TOOLS:
        return [f"{len(tools)} tools: at most {MAX_TOOLS} are allowed"]
    problems: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            problems.append(f"{where}: expected an object, got {type(tool).__name__}")
            continue
        if tool.get("type", "function") != "function":
            problems.append(f"{where}: unsupported tool type {tool.get('type')!r} (only 'function')")
            continue
        function = function_of(tool)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: function has no name")
            continue
        if not NAME_PATTERN.match(name):
            problems.append(f"{where}: function name {name!r} is not 1-64 letters, digits, '_', '.' or '-'")
        if name in seen:
            problems.append(f"{where}: duplicate function name {name!r}")
        seen.add(name)
        schema = function.get("parameters", {})
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            problems.append(f"{where}: parameters of {name!r} must be a JSON schema of type 'object'")
            continue
        problem = _schema_problem(schema)
        if problem:
            problems.append(f"{where}: parameters of {name!r} are not a valid JSON schema: {problem}")
    return problems


def _schema_problem(schema: dict) -> str | None:
    import jsonschema
    import referencing.exceptions
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    # Refs resolve lazily, only when an argument reaches them: look each one up now, in a registry
    # that retrieves nothing (no URL is ever fetched).
    resolver = Registry().resolver_with_root(Resource.from_contents(schema, default_specification=DRAFT202012))
    for ref in _refs(schema):
        try:
            resolver.lookup(ref)
        except referencing.exceptions.Unresolvable:
            return f"$ref {ref!r} cannot be resolved (only refs inside the schema are, never URLs)"
    return None


def _refs(schema: Any) -> list[str]:
    """Every `$ref` in a schema, at any depth."""
    if isinstance(schema, list):
        return [ref for item in schema for ref in _refs(item)]
    if not isinstance(schema, dict):
        return []
    own = [schema["$ref"]] if isinstance(schema.get("$ref"), str) else []
    return own + [ref for key, value in schema.items() if key != "$ref" for ref in _refs(value)]


def _validator(schema: dict):
    """A validator for the schema whose `$ref`s resolve only inside it: an empty registry refuses to
    retrieve anything, where jsonschema's default would fetch a URL."""
    import jsonschema
    from referencing import Registry

    return jsonschema.validators.validator_for(schema)(schema, registry=Registry())


def check_call(call: dict, tools: list[dict]) -> str | None:
    """What is wrong with one call against the tools (None when nothing): an unknown function,
    arguments that are not JSON or not an object, arguments that do not match the function's schema,
    a schema that cannot be checked (a `$ref` that does not resolve)."""
    import jsonschema
    import referencing.exceptions

    try:
        name, arguments = _name_and_arguments(call)
    except (KeyError, TypeError):
        return "call has no function name"
    functions = {function_of(t).get("name"): function_of(t) for t in tools if isinstance(t, dict)}
    if name not in functions:
        known = ", ".join(sorted(str(n) for n in functions)) or "none"
        return f"unknown function {name!r} (tools: {known})"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            return f"arguments of {name!r} are not JSON ({e})"
    if not isinstance(arguments, dict):
        return f"arguments of {name!r} must be a JSON object, got {type(arguments).__name__}"
    schema = functions[name].get("parameters") or {"type": "object"}
    try:
        if _schema_problem(schema):
            return None  # check_tools reports the schema itself
        error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(arguments))
    except (jsonschema.exceptions.SchemaError, referencing.exceptions.Unresolvable,
            referencing.exceptions.NoSuchResource) as e:
        return f"parameters of {name!r} cannot be checked: {e}"
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path)
        return f"arguments of {name!r} do not match its schema: {error.message}" + (f" (at '{at}')" if at else "")
    return None
