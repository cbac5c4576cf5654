"""Lint's checks of tool-calling data: the tools list, each call against it, and each tool result.

| code                   | finds                                                                       |
| ---------------------- | --------------------------------------------------------------------------- |
| `bad_tools`            | a `tools` list with a nameless or duplicate function, or a schema that is not a JSON-schema object or whose `$ref` does not resolve, over 128 tools |
| `unknown_tool`         | a call to a function the row's `tools` do not list (or a call with no tools) |
| `bad_tool_arguments`   | arguments that are not JSON, not an object, or do not match the function's schema |
| `orphan_tool_result`   | a `tool` message that answers no call (no open call, or an unknown `tool_call_id`) |
| `parallel_tool_calls`  | several calls in one turn of a row with `"parallel_tool_calls": false`        |

A model trained on these learns to call functions that do not exist, with arguments the server
cannot run, so all are errors. The checks use `specialize.tools`, as the server does.
"""

from __future__ import annotations

from specialize.data.formats import Example
from specialize.tools import check_call, check_tools

TOOL_CODES = ("bad_tools", "unknown_tool", "bad_tool_arguments", "orphan_tool_result", "parallel_tool_calls")
MESSAGES = {
    "bad_tools": "with a tools list that is not valid",
    "unknown_tool": "calling a function that the row's tools do not list",
    "bad_tool_arguments": "with call arguments that are not JSON or do not match the function's schema",
    "orphan_tool_result": "with a tool result that answers no call",
    "parallel_tool_calls": "with several calls in one turn although parallel_tool_calls is false",
}


def tool_problems(example: Example) -> list[tuple[str, str]]:
    """(code, detail) for each problem of one conversation; the detail names the turn."""
    if example.messages is None:
        return []
    tools = example.tools or []
    problems = [("bad_tools", problem) for problem in check_tools(tools)]
    open_calls: list[str | None] = []  # ids of the latest turn's calls not yet answered (None: call without id)
    for i, message in enumerate(example.messages):
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            if example.meta.get("parallel_tool_calls") is False and len(calls) > 1:
                problems.append(("parallel_tool_calls", f"messages[{i}] has {len(calls)} calls"))
            for j, call in enumerate(calls):
                problem = check_call(call, tools)
                if problem:
                    code = "unknown_tool" if problem.startswith("unknown function") else \
                        "bad_tools" if "cannot be checked" in problem else "bad_tool_arguments"
                    problems.append((code, f"messages[{i}].tool_calls[{j}]: {problem}"))
            open_calls = [call.get("id") for call in calls]
        elif message["role"] == "tool":
            wanted = message.get("tool_call_id")
            if wanted is not None and wanted in open_calls:
                open_calls.remove(wanted)
            elif open_calls and (wanted is None or None in open_calls):  # calls or results without ids
                open_calls.remove(None) if None in open_calls else open_calls.pop(0)
            else:
                why = f"tool_call_id {wanted!r} is not an open call" if wanted is not None else "no call is open"
                problems.append(("orphan_tool_result", f"messages[{i}]: {why}"))
    return problems
