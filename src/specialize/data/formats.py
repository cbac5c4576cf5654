"""Shape detection: raw records → one normalised `Example` type.

Shapes (detected per file from the first row's keys, then required of every row):

| shape               | fields                                   | becomes                              |
| ------------------- | ---------------------------------------- | ------------------------------------ |
| `qa`                | question, answer                         | user: question / assistant: answer   |
| `alpaca`            | instruction, [input], output             | user: instruction + input / assistant|
| `input_output`      | input, output                            | user / assistant                     |
| `prompt_completion` | prompt, completion                       | user / assistant                     |
| `messages`          | messages: [{role, content, [weight]}]    | as is (system/user/assistant/tool)   |
| `conversations`     | conversations: [{from, value}] (ShareGPT)| human→user, gpt→assistant            |
| `text`              | text                                     | raw text (continued pre-training)    |

`messages` is OpenAI's chat fine-tuning format in full: a `tools` list (JSON-schema functions)
beside `messages`; assistant turns with `tool_calls` (one or several; `content` null or text);
`tool` turns with the result (`tool_call_id`), which are context, never trained; the `developer`
role (read as `system`); `content` as a list of text parts; `parallel_tool_calls` (kept in `meta`,
checked by lint). An assistant turn may carry `"weight": 0` or `1`: weight 0 keeps the turn in the
sequence as context but does not train it (see `templates.segments`).

`conversations` also reads ShareGPT's tool shape (LLaMA-Factory's): `function_call` turns (a JSON
`{"name", "arguments"}`, or a list of them) become assistant tool calls, `observation` turns tool
results, and the row's `tools` (a list, or a JSON string of one) and `system` columns apply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specialize.data.io import Record, read_source
from specialize.errors import UserError
from specialize.tools import call_arguments, normalize_tools, render_tool_calls

SHAPES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "conversations": ("conversations",),
    "qa": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "input_output": ("input", "output"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
ROLES = ("system", "user", "assistant")  # the roles of plain conversations (preference data)
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass
class Example:
    """One training/eval example: a conversation, or raw text for language modelling."""

    messages: list[dict[str, Any]] | None = None  # OpenAI's: role, content (text), [weight], [tool_calls], ...
    text: str | None = None
    shape: str = "qa"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields; `tools` normalised

    @property
    def tools(self) -> list[dict] | None:
        """The functions the conversation may call (OpenAI's shape), or None. Kept in `meta` so that every
        copy of an example that keeps its meta keeps its tools."""
        return self.meta.get("tools") or None

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the last assistant turn (what a model is asked at eval time), without `weight`."""
        assert self.messages is not None
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return [{k: v for k, v in m.items() if k != "weight"} for m in self.messages[:last]]

    @property
    def reference(self) -> str:
        """The last assistant turn (the expected answer at eval time), tool calls written as the model writes them."""
        assert self.messages is not None
        return message_text([m for m in self.messages if m["role"] == "assistant"][-1])


def message_text(message: dict[str, Any]) -> str:
    """A turn's text; an assistant turn's tool calls follow it in specialize's format (`tools.render_tool_calls`)."""
    text = message.get("content") or ""
    if not message.get("tool_calls"):
        return text
    calls = [{"name": name, "arguments": arguments} for name, arguments in map(call_arguments, message["tool_calls"])]
    return (text + "\n" if text else "") + render_tool_calls(calls)


def detect_shape(row: dict[str, Any], path: str, line: int | None, shapes: dict[str, tuple] = SHAPES,
                 unknown: str = "cannot tell the data shape from") -> str:
    """The first of `shapes` whose required fields the row has; else one line naming the fields."""
    keys = set(row)
    for shape, required in shapes.items():
        if set(required) <= keys:
            return shape
    known = "; ".join("/".join(fields) for fields in shapes.values())
    raise UserError(f"{unknown} fields {sorted(keys)} (expected one of: {known})", path=path, line=line)


def _string(row: dict[str, Any], name: str, record: Record, *, allow_empty: bool = False) -> str:
    if name not in row:
        raise UserError("missing", path=record.path, line=record.line, field=name)
    value = row[name]
    if value is None:
        raise UserError("is null", path=record.path, line=record.line, field=name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric answers in CSV/JSON ("42") are legitimate
    if not isinstance(value, str):
        raise UserError(f"expected text, got {type(value).__name__}", path=record.path, line=record.line, field=name)
    if not allow_empty and not value.strip():
        raise UserError("is empty", path=record.path, line=record.line, field=name)
    return value


def _weight(value: Any, role: str, record: Record, name: str) -> int:
    if role != "assistant":
        raise UserError("only assistant turns take a weight", path=record.path, line=record.line, field=name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise UserError(f"expected 0 or 1, got {value!r}", path=record.path, line=record.line, field=name)
    return int(value)


def _content(turn: dict, key: str, record: Record, where: str, *, optional: bool) -> str:
    """A turn's text: a string, or OpenAI's list of text parts joined; "" where `optional` allows none."""
    content = turn.get(key)
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"only text parts are supported, got {kind!r}", path=record.path, line=record.line,
                                field=f"{where}.{key}[{j}]")
        content = "".join(part["text"] for part in content)
    if content is None and optional:
        return ""
    if not isinstance(content, str) or (not content.strip() and not optional):
        what = "is missing" if content is None else ("is empty" if isinstance(content, str) else
                                                      f"expected text, got {type(content).__name__}")
        raise UserError(what, path=record.path, line=record.line, field=f"{where}.{key}")
    return content


def _tool_calls(value: Any, record: Record, where: str) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls`: [{id, type: function, function: {name, arguments}}], arguments kept as given."""
    fail = (lambda message, at=where: UserError(message, path=record.path, line=record.line, field=at))
    if not isinstance(value, list) or not value:
        raise fail("expected a non-empty list of calls")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise fail("expected {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}", at)
        if call.get("type", "function") != "function":
            raise fail(f"unsupported call type {call.get('type')!r} (only 'function')", f"{at}.type")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise fail("is missing" if "name" not in function else "expected a function name", f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, (str, dict)):
            raise fail("is missing" if arguments is None else
                       f"expected a JSON string or object, got {type(arguments).__name__}", f"{at}.function.arguments")
        normal = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        calls.append({"id": call["id"], **normal} if isinstance(call.get("id"), str) else normal)
    return calls


def _sharegpt_calls(value: Any, record: Record, where: str) -> list[dict[str, Any]]:
    """A ShareGPT `function_call` turn: `{"name", "arguments"}` (or a list of them), usually as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
        raise UserError('expected a JSON call {"name": ..., "arguments": {...}} (or a list of them)',
                        path=record.path, line=record.line, field=where)
    return [{"type": "function", "function": {"name": v["name"], "arguments": v.get("arguments", {})}}
            for v in value]


def _turns(record: Record, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, Any]]:
    turns = record.data.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserError("expected a non-empty list of turns", path=record.path, line=record.line, field=key)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise UserError("expected an object", path=record.path, line=record.line, field=where)
        role = turn.get(role_key)
        if role not in roles:
            raise UserError(f"unknown role {role!r} (allowed: {', '.join(sorted(roles))})",
                            path=record.path, line=record.line, field=f"{where}.{role_key}")
        message: dict[str, Any] = {"role": roles[role]}
        if role == "function_call":  # ShareGPT: the call is the turn's value
            message["content"] = ""
            message["tool_calls"] = _sharegpt_calls(turn.get(content_key), record, f"{where}.{content_key}")
        else:
            calls = turn.get("tool_calls") if message["role"] == "assistant" else None
            # An assistant turn that calls tools may have no text (OpenAI: content null); a tool may return "".
            message["content"] = _content(turn, content_key, record, where,
                                          optional=bool(calls) or message["role"] == "tool")
            if calls:
                message["tool_calls"] = _tool_calls(calls, record, f"{where}.tool_calls")
        if message["role"] == "tool":
            message.update({k: turn[k] for k in ("tool_call_id", "name") if isinstance(turn.get(k), str)})
        if "weight" in turn:  # OpenAI's fine-tuning format: weight 0 keeps an assistant turn as context only
            message["weight"] = _weight(turn["weight"], message["role"], record, f"{where}.weight")
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("conversation has no assistant turn to learn from", path=record.path, line=record.line,
                        field=key)
    if messages[-1]["role"] != "assistant":
        raise UserError("conversation must end with an assistant turn", path=record.path, line=record.line, field=key)
    return messages


def _tools(record: Record) -> list[dict] | None:
    """The row's `tools` (a list of functions, or a JSON string of one: ShareGPT), in OpenAI's shape."""
    tools = record.data.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except ValueError:
            raise UserError("not a JSON list of tools", path=record.path, line=record.line, field="tools") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError("expected a list of function objects", path=record.path, line=record.line, field="tools")
    return normalize_tools(tools)


def to_example(record: Record, shape: str, system_prompt: str | None = None) -> Example:
    """Normalise one record of a known shape; raise `UserError` naming the field at fault."""
    row = record.data
    source = f"{record.path}:{record.line}" if record.line else record.path
    meta = {k: v for k, v in row.items() if k not in SHAPES[shape] and k != "input"}
    if shape == "text":
        return Example(text=_string(row, "text", record), shape=shape, source=source, meta=meta)
    if shape == "messages":
        messages = _turns(record, "messages", "role", "content", MESSAGE_ROLES)
    elif shape == "conversations":
        messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
        system = row.get("system")
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":  # ShareGPT's column
            messages = [{"role": "system", "content": system}] + messages
    else:
        prompt_key, answer_key = {"qa": ("question", "answer"), "alpaca": ("instruction", "output"),
                                  "prompt_completion": ("prompt", "completion"),
                                  "input_output": ("input", "output")}[shape]
        prompt = _string(row, prompt_key, record)
        if shape == "alpaca" and row.get("input") is not None:
            extra = _string(row, "input", record, allow_empty=True)  # null or blank: the instruction alone
            if extra.strip():
                prompt = prompt + "\n\n" + extra
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _string(row, answer_key, record)}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    meta.pop("tools", None)
    if shape in ("messages", "conversations") and (tools := _tools(record)):
        meta["tools"] = tools
    return Example(messages=messages, shape=shape, source=source, meta=meta)


def read_shaped(sources: list[str], detect: Callable, convert: Callable) -> list:
    """Every row of every source, as `convert(record, shape)`; each file's shape is `detect`ed
    from its first row (`detect(row, path, line)`), so a file of another shape fails at its first row."""
    if not sources:
        raise UserError("no data given (use --data FILE)")
    out: list = []
    for source in sources:
        for path, records in read_source(source).items():
            shape = detect(records[0].data, path, records[0].line)
            out.extend(convert(r, shape) for r in records)
    return out


def load_examples(sources: list[str], system_prompt: str | None = None) -> list[Example]:
    """Read every source and normalise its rows; each file's shape comes from its first row."""
    return read_shaped(sources, detect_shape, lambda record, shape: to_example(record, shape, system_prompt))
