"""Shape detection: raw records → one normalised `Example` type.

Shapes (detected per file from the first row's keys, then required of every row):

| shape               | fields                                   | becomes                              |
| ------------------- | ---------------------------------------- | ------------------------------------ |
| `qa`                | question, answer                         | user: question / assistant: answer   |
| `alpaca`            | instruction, [input], output             | user: instruction + input / assistant|
| `input_output`      | input, output                            | user / assistant                     |
| `prompt_completion` | prompt, completion                       | user / assistant                     |
| `messages`          | messages: [{role, content, [weight]}]    | as is (system/user/assistant)        |
| `conversations`     | conversations: [{from, value}] (ShareGPT)| human→user, gpt→assistant            |
| `text`              | text                                     | raw text (continued pre-training)    |

An assistant turn may carry `"weight": 0` or `1` (OpenAI's fine-tuning format): weight 0 keeps
the turn in the sequence as context but does not train it (see `templates.segments`).
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass, field
from typing import Any

from specialize.data.io import Record, read_source
from specialize.errors import UserError

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
                  "system": "system", "model": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training/eval example: a conversation, or raw text for language modelling."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    shape: str = "qa"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the last assistant turn (what a model is asked at eval time), without `weight`."""
        assert self.messages is not None
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return [{k: v for k, v in m.items() if k != "weight"} for m in self.messages[:last]]

    @property
    def reference(self) -> str:
        """The last assistant turn (the expected answer at eval time)."""
        assert self.messages is not None
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def detect_shape(row: dict[str, Any], path: str, line: int | None) -> str:
    keys = set(row)
    for shape, required in SHAPES.items():
        if set(required) <= keys:
            return shape
    known = "; ".join("/".join(fields) for fields in SHAPES.values())
    raise UserError(f"cannot tell the data shape from fields {sorted(keys)} (expected one of: {known})",
                    path=path, line=line)


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


def _turns(record: Record, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
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
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            what = "is missing" if content is None else ("is empty" if isinstance(content, str) else
                                                          f"expected text, got {type(content).__name__}")
            raise UserError(what, path=record.path, line=record.line, field=f"{where}.{content_key}")
        message = {"role": roles[role], "content": content}
        if "weight" in turn:  # OpenAI's fine-tuning format: weight 0 keeps an assistant turn as context only
            message["weight"] = _weight(turn["weight"], message["role"], record, f"{where}.weight")
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("conversation has no assistant turn to learn from", path=record.path, line=record.line,
                        field=key)
    if messages[-1]["role"] != "assistant":
        raise UserError("conversation must end with an assistant turn", path=record.path, line=record.line, field=key)
    return messages


def to_example(record: Record, shape: str, system_prompt: str | None = None) -> Example:
    """Normalise one record of a known shape; raise `UserError` naming the field at fault."""
    row = record.data
    source = f"{record.path}:{record.line}" if record.line else record.path
    meta = {k: v for k, v in row.items() if k not in SHAPES[shape] and k != "input"}
    if shape == "text":
        return Example(text=_string(row, "text", record), shape=shape, source=source, meta=meta)
    if shape == "messages":
        messages = _turns(record, "messages", "role", "content", {r: r for r in ROLES})
    elif shape == "conversations":
        messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
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
