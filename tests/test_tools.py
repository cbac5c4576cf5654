"""The one tool-call format (specialize.tools): rendering, parsing, and the checks lint and serve use."""

import json

from helpers import ASSETS
from transformers.utils.chat_template_utils import render_jinja_template

from specialize import tools as T

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}  # a bare function


def test_render_tool_calls_is_the_hermes_form():
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"name": "get_time", "arguments": {}}]
    assert T.render_tool_calls(calls) == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_tools_system_text_copies_qwen25_wording():
    text = T.tools_system_text([WEATHER])
    assert text.startswith("# Tools\n\nYou may call one or more functions")
    assert "\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n" in text
    assert text.endswith('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    qwen = (ASSETS / "templates" / "qwen2.5.jinja").read_text()
    assert T.TOOLS_INTRO.replace("\n", "\\n") in qwen and T.TOOLS_OUTRO.replace("\n", "\\n").replace('"', '\\"') in qwen


def test_qwen25_template_renders_calls_as_render_tool_calls():
    qwen = (ASSETS / "templates" / "qwen2.5.jinja").read_text()
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    rendered = render_jinja_template([messages], tools=[WEATHER], chat_template=qwen)[0][0]
    assert "<|im_start|>assistant\n" + T.render_tool_calls(calls) + "<|im_end|>" in rendered
    assert T.tools_system_text([WEATHER]) + "<|im_end|>" in rendered


def test_jinja_fragments_equal_the_python_renderings():
    jinja = ("{%- if tools %}" + T.JINJA_TOOLS_BLOCK + "{%- endif %}|{%- for message in messages %}"
        "{%- if message.role == 'tool' %}" + T.JINJA_RESULT + "{%- else %}" + T.JINJA_CALLS + "{%- endif %}|"
        "{%- endfor %}")
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
             {"function": {"name": "get_time", "arguments": "{}"}}]
    messages = [{"role": "assistant", "content": "", "tool_calls": calls}, {"role": "tool", "content": "12°C"}]
    out = render_jinja_template([messages], tools=[WEATHER, TIME], chat_template=jinja)[0][0]
    assert out == "|".join([T.tools_system_text([WEATHER, TIME]), T.render_tool_calls(calls),
                            T.render_tool_result("12°C"), ""])


def test_parse_round_trips_render_and_keeps_text_outside():
    calls = [T.openai_call("get_weather", {"city": "Paris"}), T.openai_call("get_time", {})]
    text, parsed = T.parse_tool_calls("Let me check.\n" + T.render_tool_calls(calls))
    assert text == "Let me check."
    assert [(c["type"], c["function"]) for c in parsed] == [(c["type"], c["function"]) for c in calls]
    assert all(c["id"].startswith("call_") for c in parsed) and parsed[0]["id"] != parsed[1]["id"]


def test_parse_is_tolerant_of_whitespace_and_string_arguments():
    text, calls = T.parse_tool_calls('<tool_call>  {"name":"f","arguments":"{\\"a\\": 1}"}</tool_call>')
    assert text == "" and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


def test_unclosed_or_non_json_call_stays_text_and_is_invalid():
    scan = T.scan_tool_calls('ok <tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call> then <tool_call>\n{"na')
    assert scan.calls == []
    assert scan.invalid == ['<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>', '<tool_call>\n{"na']
    assert scan.text.startswith("ok <tool_call>") and scan.text.endswith('{"na')
    assert T.scan_tool_calls('<tool_call>["f"]</tool_call>').invalid == ['<tool_call>["f"]</tool_call>']


def test_llama31_bare_json_call_is_read_and_plain_text_is_not():
    text, calls = T.parse_tool_calls(' {"name": "get_weather", "parameters": {"city": "Oslo"}} ')
    assert text == "" and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert T.parse_tool_calls('{"answer": 42}') == ('{"answer": 42}', [])
    assert T.parse_tool_calls("Paris is in France.") == ("Paris is in France.", [])


def test_template_messages_normalises_openai_messages():
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                {"role": "assistant", "content": "x", "tool_calls": []}]
    assert T.template_messages(messages) == [
        {"role": "system", "content": "Be brief"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "assistant", "content": "x"}]
    assert messages[1]["content"] is None  # the caller's messages are untouched


def test_check_tools_names_each_problem():
    assert T.check_tools([WEATHER, TIME]) == []
    assert T.check_tools({"name": "f"}) == ["expected a list of tools, got dict"]
    assert T.check_tools([{"type": "function", "function": {"description": "x"}}, WEATHER, WEATHER,
                          {"name": "bad name"}, {"name": "g", "parameters": {"type": "array"}},
                          {"name": "h", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}]) == [
        "tools[0]: function has no name",
        "tools[2]: duplicate function name 'get_weather'",
        "tools[3]: function name 'bad name' is not 1-64 letters, digits, '_', '.' or '-'",
        "tools[4]: parameters of 'g' must be a JSON schema of type 'object'",
        "tools[5]: parameters of 'h' are not a valid JSON schema: 'nope' is not valid under any of the given schemas"]


def test_check_call_unknown_not_json_and_schema_mismatch():
    tools = [WEATHER, TIME]
    assert T.check_call(T.openai_call("get_weather", {"city": "Paris", "days": 3}), tools) is None
    assert T.check_call({"name": "get_time", "arguments": {}}, tools) is None
    assert T.check_call(T.openai_call("book", {}), tools) == "unknown function 'book' (tools: get_time, get_weather)"
    assert T.check_call({"function": {"name": "get_weather", "arguments": "{city"}}, tools).startswith(
        "arguments of 'get_weather' are not JSON (")
    assert T.check_call({"function": {"name": "get_weather", "arguments": "[1]"}}, tools) == (
        "arguments of 'get_weather' must be a JSON object, got list")
    assert T.check_call(T.openai_call("get_weather", {"days": 2}), tools) == (
        "arguments of 'get_weather' do not match its schema: 'city' is a required property")
    assert T.check_call(T.openai_call("get_weather", {"city": "Oslo", "days": "two"}), tools) == (
        "arguments of 'get_weather' do not match its schema: 'two' is not of type 'integer' (at 'days')")


def test_a_bare_object_is_a_call_only_with_exactly_name_and_arguments():
    """An answer that is JSON data with a "name" (a person, a product) is text, not a call to it."""
    assert T.parse_tool_calls('{"name": "Alice", "age": 30}') == ('{"name": "Alice", "age": 30}', [])
    assert T.parse_tool_calls('{"name": "f", "arguments": {}, "id": 1}')[1] == []
    assert T.parse_tool_calls('{"name": "Alice", "arguments": "x"}')[1] == []  # arguments must be an object
    _, calls = T.parse_tool_calls('{"name": "f", "arguments": {"a": 1}}')
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": '{"a": 1}'}]


def test_a_close_tag_inside_an_argument_string_does_not_end_the_call():
    html = {"html": "a </tool_call> b"}
    text = "Here.\n" + T.render_tool_calls([{"name": "post", "arguments": html}]) + " done"
    scan = T.scan_tool_calls(text)
    assert [json.loads(c["function"]["arguments"]) for c in scan.calls] == [html]
    assert (scan.text, scan.invalid) == ("Here.\n done", [])
    assert T.first_call_end(text) == len(text) - len(" done")
    cut = text.index("a </tool_call>") + len("a </tool_call>")  # a stream that is still inside the string
    assert T.first_call_end(text[:cut], final=False) is None


def test_several_objects_in_one_block_are_several_calls():
    scan = T.scan_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n{"name": "g", "arguments": {"a": 1}}\n'
                             '</tool_call> <tool_call>{"name": "f", "arguments": {}} junk</tool_call>')
    assert [c["function"]["name"] for c in scan.calls] == ["f", "g"]
    assert scan.invalid == ['<tool_call>{"name": "f", "arguments": {}} junk</tool_call>']


def test_calls_to_names_not_offered_stay_text():
    text = T.render_tool_calls([{"name": "get_time", "arguments": {}}, {"name": "book", "arguments": {}}])
    scan = T.scan_tool_calls(text, frozenset({"get_time"}))
    assert [c["function"]["name"] for c in scan.calls] == ["get_time"]
    assert scan.text == T.render_tool_calls([{"name": "book", "arguments": {}}]) and scan.invalid == []
    assert T.scan_tool_calls('{"name": "book", "arguments": {}}', frozenset({"f"})).calls == []


def test_unresolvable_refs_are_named_and_never_fetched(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a $ref was fetched")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    local = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}
    remote = {"name": "g", "parameters": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a"}}}}
    assert T.check_tools([local, remote]) == [
        "tools[0]: parameters of 'f' are not a valid JSON schema: $ref '#/$defs/missing' cannot be resolved "
        "(only refs inside the schema are, never URLs)",
        "tools[1]: parameters of 'g' are not a valid JSON schema: $ref 'https://example.com/a' cannot be resolved "
        "(only refs inside the schema are, never URLs)"]
    assert T.check_call({"name": "f", "arguments": {"a": 1}}, [local]) is None  # check_tools reports it
    assert T.check_call({"name": "g", "arguments": {"a": 1}}, [remote]) is None
    ok = {"name": "h", "parameters": {"type": "object", "$defs": {"n": {"type": "integer"}},
                                      "properties": {"a": {"$ref": "#/$defs/n"}}}}
    assert T.check_tools([ok]) == []
    assert T.check_call({"name": "h", "arguments": {"a": "x"}}, [ok]) == (
        "arguments of 'h' do not match its schema: 'x' is not of type 'integer' (at 'a')")


def test_check_call_names_a_schema_it_cannot_check(monkeypatch):
    """Should a ref slip past check_tools, the call's check says so instead of raising."""
    monkeypatch.setattr(T, "_schema_problem", lambda schema: None)
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a"}}}}
    assert T.check_call({"name": "f", "arguments": {"a": 1}}, [tool]).startswith("parameters of 'f' cannot be checked: ")


def test_at_most_max_tools():
    tools = [{"name": f"f{i}"} for i in range(T.MAX_TOOLS + 1)]
    assert T.check_tools(tools[:-1]) == []
    assert T.check_tools(tools) == ["129 tools: at most 128 are allowed"]
