"""Tool calling and structured output on the server: what a chat request asks for, and its answer's calls.

The format is the one in `specialize.tools` (Qwen2.5's Hermes form): the template lists the tools
in the system turn, the model writes `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
blocks, and `tools.scan_tool_calls` reads them back; a call to a tool the request did not offer stays
text.

`tool_choice`:
- `auto` (the default with tools): the model writes freely; calls are parsed from its answer.
  `parallel_tool_calls: false` ends the answer after its first call.
- `required` or a named function: the answer is only calls, enforced by a grammar (see
  `constrained.py`) whose arguments match each function's schema; one call unless parallel.
- `none`: the tools stay in the prompt (the conversation may hold earlier calls and results,
  and the prompt is the one the model was trained on), and a grammar forbids `<tool_call>`, so
  the answer is text.

`response_format` `json_object` / `json_schema` is a grammar too; with `auto` tools the answer is
either that JSON or calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from specialize.data.templates import TemplateRaised
from specialize.serve import constrained
from specialize.serve.schema import APIError, ChatCompletionRequest
from specialize.tools import (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_block, check_tools, function_of, normalize_tools,
                              scan_tool_calls, template_messages)


@dataclass(frozen=True)
class Plan:
    """How one chat request is answered."""

    tools: list[dict] | None  # offered to the template (OpenAI's shape)
    # The names of the tools whose calls are parsed out of the answer (tool_choice auto, required, named);
    # empty: the answer is text. A call to another name stays text: the client cannot run it.
    parse_calls: frozenset[str]
    grammar: str | None  # what the answer must match (llguidance Lark), or None for free text
    grammar_param: str | None  # the request field the grammar comes from, for error messages
    end_after: str | None  # end the answer once it holds this (a single call under auto)


def plan(body: ChatCompletionRequest) -> Plan:
    """The tools, grammar and parsing a request asks for; APIError 400 for anything that cannot be honoured."""
    schema, json_wanted = None, False
    if body.response_format is not None and body.response_format.type != "text":
        json_wanted = True
        if body.response_format.type == "json_schema":
            schema = body.response_format.json_schema.schema_
            if schema is not None and not isinstance(schema.get("type", "object"), (str, list)):
                raise APIError(400, "response_format.json_schema.schema: 'type' must be a string or a list",
                               param="response_format")
    if body.tools is None:
        for field in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, field) is not None:
                raise APIError(400, f"{field} is only allowed when tools are given", param=field)
        grammar = constrained.json_grammar(schema) if json_wanted else None
        return Plan(None, frozenset(), grammar, "response_format" if grammar else None, None)

    problems = check_tools(body.tools) if body.tools else ["tools must list at least one tool"]
    if problems:
        raise APIError(400, problems[0], param="tools", code="invalid_tools")
    tools = normalize_tools(body.tools)
    parallel = body.parallel_tool_calls is not False
    choice, name = body.tool_choice or "auto", None
    names = frozenset(function_of(t)["name"] for t in tools)
    if not isinstance(choice, str):
        name = choice.function["name"]
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        choice = "required"
    if choice == "none":
        grammar = constrained.json_grammar(schema) if json_wanted else constrained.NO_TOOL_CALL
        return Plan(tools, frozenset(), grammar, "response_format" if json_wanted else "tool_choice", None)
    if choice == "required":
        return Plan(tools, names, constrained.tool_calls_grammar(tools, name, parallel), "tools", None)
    if json_wanted:
        return Plan(tools, names, constrained.json_or_tool_calls_grammar(schema, tools, parallel), "response_format",
                    None)
    return Plan(tools, names, None, None, None if parallel else TOOL_CALL_CLOSE)


def check_order(messages: list[dict]) -> None:
    """A `tool` message must answer a call of the assistant turn before it (OpenAI's rule)."""
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            open_calls = {call["id"] for call in message.get("tool_calls") or []}
        elif message["role"] == "tool":
            if message["tool_call_id"] not in open_calls:
                raise APIError(400, f"messages.{i}: a tool message must answer a tool call of the assistant "
                                    f"message before it (no call with id {message['tool_call_id']!r})",
                               param=f"messages.{i}.tool_call_id")
        else:
            open_calls = set()


def render(generator, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt for an OpenAI conversation, rendered by the run's template with the tools.

    A template that silently drops tools, calls or results would prompt the model with something
    other than what the client sent, so that is a 400 instead.
    """
    check_order(messages)
    ready = template_messages(messages)  # as the template reads them (`Template.render` prepares its own copy)
    text = _render(generator, messages, tools)
    if tools and text == _render(generator, messages, None):
        raise APIError(400, "the run's chat template does not render tools (it ignores them); serve a model whose "
                            "template supports tools, e.g. one fine-tuned on tool-calling chats", param="tools")
    for i, message in enumerate(ready):
        missing = [c["function"]["name"] for c in message.get("tool_calls") or [] if c["function"]["name"] not in text]
        if missing or (message["role"] == "tool" and message["content"] not in text):
            raise APIError(400, f"messages.{i}: the run's chat template does not render "
                                f"{'tool calls' if missing else 'tool results'}", param=f"messages.{i}")
    return text


def _render(generator, messages: list[dict], tools: list[dict] | None) -> str:
    try:
        return generator.template.render(generator.tokenizer, messages, add_generation_prompt=True, tools=tools)
    except TemplateRaised as e:  # a template without tool support, or one whose Jinja refuses the conversation
        raise APIError(400, f"the run's chat template cannot render this conversation: {e}",
                       param="tools" if tools else "messages") from None


def reply(text: str, parse_calls: frozenset[str] | bool) -> tuple[str | None, list[dict]]:
    """(content, calls) of an answer: content is None when the answer is only calls, as OpenAI's.
    `parse_calls`: the tool names whose calls are parsed (True: any name)."""
    if not parse_calls:
        return text, []
    scan = scan_tool_calls(text, _names(parse_calls))  # content is stripped, as a stream (ToolStream) shows it
    return (scan.text or None) if scan.calls else scan.text, scan.calls


def _names(parse_calls: frozenset[str] | bool) -> frozenset[str] | None:
    return None if parse_calls is True else frozenset(parse_calls)


def finish_reason(completion, calls: list) -> str:
    """The answer's finish_reason: "tool_calls" when it ended by itself after calling tools."""
    return "tool_calls" if calls and completion.finish_reason == "stop" else completion.finish_reason


class ToolStream:
    """Splits a streamed answer into content pieces and tool calls, as they become certain.

    Text that may be the start of `<tool_call>` is held back, so no part of a tag shows as content;
    a block is handed out as a call once it closes (or as content, if it is not a valid call, as
    the non-streamed answer keeps it). An answer that starts as a JSON object is held to its end
    (it may be a bare call). Whitespace around calls is held until more text follows, so the
    pieces join to the non-streamed content.
    """

    def __init__(self, names: frozenset[str] | bool = True):
        """`names`: the tool names whose calls are calls (True: any); a block calling another is content."""
        self.buffer, self.held, self.started, self.calls = "", "", False, 0
        self.names = _names(names)

    def feed(self, piece: str) -> list[str | dict]:
        """Content strings and calls (OpenAI's dicts) that `piece` makes certain."""
        self.buffer += piece
        return [] if self._maybe_bare_call() else self._drain(final=False)

    def finish(self) -> list[str | dict]:
        """What is left at the end: an unclosed block or a partial tag is content after all."""
        if self._maybe_bare_call():
            scan = scan_tool_calls(self.buffer, self.names)
            if scan.calls and not scan.invalid:
                self.buffer, self.calls = "", len(scan.calls)
                return list(scan.calls)
        out = self._drain(final=True)
        self._content(self.buffer, out)
        self.buffer = ""
        return out

    def _maybe_bare_call(self) -> bool:
        """Llama 3.1 writes a call as the whole answer, one bare JSON object: only its end can tell."""
        return not self.started and not self.calls and self.buffer.lstrip().startswith("{") \
            and TOOL_CALL_OPEN not in self.buffer

    def _drain(self, final: bool) -> list[str | dict]:
        out: list[str | dict] = []
        while True:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, TOOL_CALL_OPEN)
                self._content(self.buffer[: len(self.buffer) - keep], out)
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            self._content(self.buffer[:start], out)
            self.buffer = self.buffer[start:]
            block = call_block(self.buffer, 0, final)  # the same end as the non-streamed answer's
            if block is None:
                return out
            text, self.buffer = self.buffer[:block[0]], self.buffer[block[0]:]
            calls = scan_tool_calls(text, self.names).calls
            if calls:
                out.extend(calls)
                self.calls += len(calls)
            else:
                self._content(text, out)

    def _content(self, text: str, out: list) -> None:
        if not self.started:
            text = text.lstrip()
        if not text:
            return
        body = text.rstrip()
        if body:
            out.append(self.held + body)
            self.started, self.held = True, ""
        self.held += text[len(body):]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that a next piece could complete into `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
