"""`specialize lint` on tool-calling data (each planted tool defect named) and on preference data."""

from __future__ import annotations

import pytest
from helpers import run_lint, write_jsonl

pytestmark = pytest.mark.usefixtures("plain_output")  # lint's plain ⟦ ⟧ output is what these tests pin

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}


def call(name: str, arguments: str, call_id: str = "c1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def row(calls: list[dict], results: list[dict] | None = None, tools=(WEATHER,), **extra) -> dict:
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in calls] if results is None \
        else results
    return {"tools": list(tools), **extra, "messages": [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": calls},
        *results, {"role": "assistant", "content": "It is sunny."}]}


def test_clean_tool_data_passes_and_shows_the_calls_trained(tmp_path, capsys):
    data = write_jsonl(tmp_path / "tools.jsonl", [row([call("get_weather", '{"city": "Oslo"}')])])
    code, out = run_lint(capsys, data=[str(data)], show=1)
    assert code == 0, out
    assert "template 'chatml'" in out
    assert '⟦<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|endoftext|>\n⟧' in out
    assert "OK: 1 example, no problems found" in out


def test_each_tool_defect_is_named_with_its_row(tmp_path, capsys):
    rows = [row([call("get_weather", '{"city": "Oslo"}')]),  # clean
            row([call("book_flight", "{}")]),
            row([call("get_weather", "{city: Oslo}")]),
            row([call("get_weather", '{"town": "Oslo"}')]),
            row([call("get_weather", '{"city": "Oslo"}')], results=[
                {"role": "tool", "tool_call_id": "c1", "content": "a"}, {"role": "tool", "tool_call_id": "c9",
                                                                         "content": "b"}]),
            row([call("get_weather", '{"city": "Oslo"}')], tools=(WEATHER, WEATHER)),
            row([call("get_weather", '{"city": "A"}', "c1"), call("get_weather", '{"city": "B"}', "c2")],
                parallel_tool_calls=False)]
    data = str(write_jsonl(tmp_path / "tools.jsonl", rows))
    code, out = run_lint(capsys, data=[data])
    assert code == 1
    lines = out.splitlines()
    assert (f"error unknown_tool: 1 example calling a function that the row's tools do not list: first at "
            f"{data}:2 messages[1].tool_calls[0]: unknown function 'book_flight' (tools: get_weather)") in lines
    assert any(line.startswith(f"error bad_tool_arguments: 2 examples with call arguments that are not JSON or do not "
                               f"match the function's schema: first at {data}:3 messages[1].tool_calls[0]: arguments "
                               f"of 'get_weather' are not JSON (") for line in lines)
    assert f"  {data}:3, {data}:4" in lines
    assert (f"error orphan_tool_result: 1 example with a tool result that answers no call: first at {data}:5 "
            f"messages[3]: tool_call_id 'c9' is not an open call") in lines
    assert (f"error bad_tools: 1 example with a tools list that is not valid: first at {data}:6 tools[1]: duplicate "
            f"function name 'get_weather'") in lines
    assert (f"error parallel_tool_calls: 1 example with several calls in one turn although parallel_tool_calls is "
            f"false: first at {data}:7 messages[1] has 2 calls") in lines
    assert "error empty_answer" not in out  # a turn that only calls a tool is not an empty answer


def test_sharegpt_calls_without_a_tools_column_are_unknown(tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}]))
    code, out = run_lint(capsys, data=[data])
    assert code == 1 and "unknown function 'f' (tools: none)" in out and "orphan_tool_result" not in out


def test_preference_data_is_recognised_and_checked(tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Capital of Spain?", "chosen": "Madrid.", "rejected": "Madrid."},
        {"prompt": "Capital of Italy?", "chosen": "Rome.", "rejected": " "}]))
    code, out = run_lint(capsys, data=[data], show=1)
    assert code == 1
    assert "3 preference rows (3 pairs, 0 labelled answers), 0 eval; template 'qa'" in out
    assert "example " + data + ":1 chosen (trained bytes in ⟦ ⟧):\n### Question:\nCapital of France?\n\n### Answer:\n" \
           "⟦Paris.<|endoftext|>⟧" in out
    assert "rejected (trained bytes in ⟦ ⟧):" in out
    assert f"error identical: {data}:2: chosen equals rejected (nothing to prefer)\n  {data}:2" in out
    assert f"error empty_side: {data}:3: rejected is empty" in out
    assert "FAILED: 2 error(s) in 3 preference rows" in out


def test_preference_rows_finetune_would_drop_are_named(tmp_path, capsys, tiny_llama):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Capital of France?", "chosen": "Paris. " * 40, "rejected": "Lyon."}]))
    code, out = run_lint(capsys, data=[data], base=str(tiny_llama), max_seq_tokens=48)
    assert code == 1
    assert f"error does_not_fit: 1 row(s) finetune drops: longer than --max-seq-tokens 48\n  {data}:2" in out


def test_kto_and_openai_preference_rows(tmp_path, capsys):
    kto = str(write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi?", "completion": "Hello.", "label": True},
                                                   {"prompt": "Hi?", "completion": "Go away.", "label": False}]))
    code, out = run_lint(capsys, data=[kto], show=2)
    assert code == 0, out
    assert "2 preference rows (0 pairs, 2 labelled answers)" in out and "completion, undesirable" in out
    openai = str(write_jsonl(tmp_path / "openai.jsonl", [{
        "input": {"messages": [{"role": "user", "content": "Hi?"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello."}],
        "non_preferred_output": [{"role": "assistant", "content": "Hello."}]}]))
    code, out = run_lint(capsys, data=[openai])
    assert code == 1 and "error identical" in out


def test_prompt_completion_without_label_stays_sft(tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi?", "completion": "Hello."}]))
    code, out = run_lint(capsys, data=[data])
    assert code == 0 and "1 training example, 0 eval" in out


def test_lint_with_a_family_base_renders_tools_through_its_template(tmp_path, capsys, tokenizer_dir):
    from families import BY_NAME, save_family

    base = save_family(BY_NAME["qwen2.5"], tokenizer_dir, tmp_path / "qwen")
    data = write_jsonl(tmp_path / "tools.jsonl", [row([call("get_weather", '{"city": "Oslo"}')])])
    _, out = run_lint(capsys, data=[str(data)], base=str(base), show=1)
    # the tools block in the tests' 512-token BPE is longer than the tiny model's 512 positions: too_long only;
    # no template_roundtrip: the inference prompt (with tools) is the prefix training has
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("error")] == ["error too_long"]
    assert "template 'tokenizer'" in out and "# Tools\n\nYou may call one or more functions" in out
    assert '⟦<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n⟧' in out


def test_a_schema_with_a_ref_that_does_not_resolve_is_bad_tools_not_a_traceback(tmp_path, capsys):
    remote = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"$ref": "https://example.com/city.json"}}}}}
    data = str(write_jsonl(tmp_path / "tools.jsonl", [row([call("get_weather", '{"city": "Oslo"}')], tools=(remote,))]))
    code, out = run_lint(capsys, data=[data])
    assert code == 1
    assert (f"error bad_tools: 1 example with a tools list that is not valid: first at {data}:1 tools[0]: parameters "
            f"of 'get_weather' are not a valid JSON schema: $ref 'https://example.com/city.json' cannot be resolved "
            f"(only refs inside the schema are, never URLs)") in out.splitlines()
    assert "bad_tool_arguments" not in out


def test_too_many_tools_are_bad_tools(tmp_path, capsys):
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)] + [WEATHER]
    data = str(write_jsonl(tmp_path / "tools.jsonl", [row([call("get_weather", '{"city": "Oslo"}')], tools=tools)]))
    code, out = run_lint(capsys, data=[data])
    assert code == 1 and "tools list that is not valid: first at " + data + ":1 130 tools: at most 128" in out
