"""Tool-calling data: OpenAI's chat fine-tuning format in full and ShareGPT's tool shape read into one
Example; rendered by our chatml and by real family templates; trained on the assistant's text and
calls only; rendered at serve time (apply_chat_template with tools) exactly as in training."""

from __future__ import annotations

import json

import pytest
from families import BY_NAME, family_tokenizer
from helpers import write_jsonl
from transformers import AutoTokenizer

from specialize import tools as T
from specialize.data.formats import load_examples
from specialize.data.marking import runs
from specialize.data.templates import install_template, ours, resolve_template
from specialize.data.tokenize import encode_chat
from specialize.errors import UserError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
OPENAI_ROW = {
    "tools": [WEATHER], "parallel_tool_calls": False,
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Use tools "}, {"type": "text", "text": "well."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 12}'},
        {"role": "assistant", "content": "12 degrees.", "weight": 1}]}
SHAREGPT_ROW = {
    "tools": json.dumps([WEATHER["function"]]), "system": "Use tools well.",
    "conversations": [{"from": "human", "value": "Weather in Paris?"},
                      {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                      {"from": "observation", "value": '{"temp": 12}'},
                      {"from": "gpt", "value": "12 degrees."}]}
CALLS_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _example(tmp_path, row):
    return load_examples([str(write_jsonl(tmp_path / "tools.jsonl", [row]))])[0]


def _trained_texts(item, tokenizer) -> list[str]:
    return [tokenizer.decode(item.input_ids[a:b]) for a, b in runs(item.labels)]


def test_openai_format_in_full_is_one_example(tmp_path):
    example = _example(tmp_path, OPENAI_ROW)
    assert example.messages == [
        {"role": "system", "content": "Use tools well."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 12}', "tool_call_id": "call_1"},
        {"role": "assistant", "content": "12 degrees.", "weight": 1}]
    assert example.tools == [WEATHER] and example.meta["parallel_tool_calls"] is False
    assert example.reference == "12 degrees."
    assert _example(tmp_path, {**OPENAI_ROW, "messages": OPENAI_ROW["messages"][:3]}).reference == CALLS_TEXT


def test_sharegpt_tool_shape_reads_as_the_openai_one(tmp_path):
    sharegpt, openai = _example(tmp_path, SHAREGPT_ROW), _example(tmp_path, OPENAI_ROW)
    strip = (lambda ms: [{k: v for k, v in m.items() if k not in ("id", "tool_call_id", "weight")} for m in ms])
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert sharegpt.messages[2] == {"role": "assistant", "content": "", "tool_calls": calls}
    assert sharegpt.tools == openai.tools
    assert [m["role"] for m in sharegpt.messages] == [m["role"] for m in openai.messages]
    assert strip(sharegpt.messages)[3:] == strip(openai.messages)[3:]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "x"}, {"role": "assistant"}], "field 'messages[1].content': is missing"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
      {"role": "assistant", "content": "y"}],
     "field 'messages[0].content[0]': only text parts are supported, got 'image_url'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}],
     "field 'messages[1].tool_calls[0].function.name': is missing"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}],
     "field 'messages[1].tool_calls[0].function.arguments': expected a JSON string or object, got int"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "weight": 0},
      {"role": "assistant", "content": "y"}], "field 'messages[1].weight': only assistant turns take a weight"),
])
def test_bad_tool_rows_are_one_line(tmp_path, messages, error):
    with pytest.raises(UserError) as e:
        _example(tmp_path, {"messages": messages})
    assert str(e.value) == f"{tmp_path / 'tools.jsonl'}:1: {error}"


def test_chatml_renders_the_documented_format(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    example = _example(tmp_path, OPENAI_ROW)
    eos = tokenizer.eos_token
    text = ours("chatml", tokenizer).render(tokenizer, example.messages, False, tools=example.tools)
    assert text == (f"<|im_start|>system\nUse tools well.\n\n{T.tools_system_text([WEATHER])}{eos}\n"
                    f"<|im_start|>user\nWeather in Paris?{eos}\n"
                    f"<|im_start|>assistant\n{CALLS_TEXT}{eos}\n"
                    f'<|im_start|>user\n<tool_response>\n{{"temp": 12}}\n</tool_response>{eos}\n'
                    f"<|im_start|>assistant\n12 degrees.{eos}\n")
    # parallel calls and consecutive results: one block per call, one user turn for the results
    two = [{"role": "user", "content": "Paris and Oslo?"},
           {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, CALL]},
           {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "ok"}]
    text = ours("chatml", tokenizer).render(tokenizer, two, False, tools=[WEATHER])
    assert (f"<|im_start|>assistant\nChecking.\n{CALLS_TEXT}\n{CALLS_TEXT}{eos}\n<|im_start|>user\n"
            f"<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response>{eos}\n") in text
    assert text.startswith(f"<|im_start|>system\n{T.tools_system_text([WEATHER])}{eos}\n")  # no system message


def test_chatml_masks_all_but_the_assistants_text_and_calls(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    example = _example(tmp_path, OPENAI_ROW)
    item = encode_chat(example, tokenizer, resolve_template("auto", tokenizer, {"messages"}))
    eos = tokenizer.eos_token
    assert _trained_texts(item, tokenizer) == [f"{CALLS_TEXT}{eos}\n", f"12 degrees.{eos}\n"]


def test_served_prompt_equals_the_training_prompt_token_for_token(tmp_path, tokenizer_dir):
    """Serve renders the saved template with `apply_chat_template(messages, tools=...)`: the prompt before each
    trained turn must be the very token ids training saw."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    example = _example(tmp_path, OPENAI_ROW)
    template = resolve_template("auto", tokenizer, {"messages"})
    item = encode_chat(example, tokenizer, template)
    install_template(tokenizer, template, system_prompt="Default.")
    tokenizer.save_pretrained(tmp_path / "run")
    served = AutoTokenizer.from_pretrained(tmp_path / "run")
    request = OPENAI_ROW["messages"]  # as a client sends them: developer role, content parts, string arguments
    for (start, _), last in zip(runs(item.labels), (2, 4)):
        ids = served.apply_chat_template(T.template_messages(request[:last]), tools=[WEATHER], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)
        assert ids == item.input_ids[:start]


def test_qwen25_template_trains_the_calls_and_serves_the_same_prompt(tmp_path, tokenizer_dir):
    tokenizer = family_tokenizer(BY_NAME["qwen2.5"], tokenizer_dir)
    example = _example(tmp_path, OPENAI_ROW)
    template = resolve_template("auto", tokenizer, {"messages"})
    assert template.name == "tokenizer" and template.renders_tools
    item = encode_chat(example, tokenizer, template)
    assert _trained_texts(item, tokenizer) == [f"{CALLS_TEXT}<|im_end|>\n", "12 degrees.<|im_end|>\n"]
    start = runs(item.labels)[0][0]
    served = tokenizer.apply_chat_template(T.template_messages(OPENAI_ROW["messages"][:2]), tools=[WEATHER],
                                           tokenize=True, add_generation_prompt=True, return_dict=False)
    assert served == item.input_ids[:start]
    assert T.tools_system_text([WEATHER]) in tokenizer.decode(served)
    # specialize's own chatml renders the same assistant turn as Qwen2.5 (same format, different end token)
    assert T.parse_tool_calls(_trained_texts(item, tokenizer)[0].removesuffix("<|im_end|>\n"))[1][0]["function"] == \
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_llama31_template_trains_its_own_call_form(tmp_path, tokenizer_dir):
    tokenizer = family_tokenizer(BY_NAME["llama3"], tokenizer_dir)
    example = _example(tmp_path, {**OPENAI_ROW, "messages": OPENAI_ROW["messages"][1:3]})
    item = encode_chat(example, tokenizer, resolve_template("auto", tokenizer, {"messages"}))
    [trained] = _trained_texts(item, tokenizer)
    assert trained == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    assert T.parse_tool_calls(trained.removesuffix("<|eot_id|>"))[1][0]["function"]["name"] == "get_weather"


def test_a_template_without_tools_refuses_tool_data(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    example = _example(tmp_path, OPENAI_ROW)
    with pytest.raises(UserError, match="template 'qa' cannot render tools or tool calls; use --template chatml"):
        encode_chat(example, tokenizer, ours("qa", tokenizer))
    gemma = family_tokenizer(BY_NAME["gemma2"], tokenizer_dir)
    with pytest.raises(UserError, match=r"template 'tokenizer'.* cannot render tools"):
        encode_chat(example, gemma, resolve_template("auto", gemma, {"messages"}))


def test_qwen3_template_rewrites_history_and_every_turn_is_trained_after_its_inference_prompt(tmp_path,
                                                                                            tokenizer_dir):
    """Qwen3's template drops an earlier assistant turn's think block once later turns follow, so no rendering
    extends the previous one. The conversation is trained as rendered once: each turn right after the exact
    prompt inference renders for it, earlier turns as the history shows them, the last with its think block."""
    tokenizer = family_tokenizer(BY_NAME["qwen3"], tokenizer_dir)
    template = resolve_template("auto", tokenizer, {"messages"})
    one = encode_chat(_example(tmp_path, {**OPENAI_ROW, "messages": OPENAI_ROW["messages"][1:3]}), tokenizer, template)
    assert _trained_texts(one, tokenizer) == [f"<think>\n\n</think>\n\n{CALLS_TEXT}<|im_end|>\n"]
    example = _example(tmp_path, OPENAI_ROW)
    item = encode_chat(example, tokenizer, template)
    assert _trained_texts(item, tokenizer) == [f"{CALLS_TEXT}<|im_end|>\n",
                                               "<think>\n\n</think>\n\n12 degrees.<|im_end|>\n"]
    for (start, _), last in zip(runs(item.labels), (2, 4)):
        prompt = template.render(tokenizer, example.messages[:last], True, tools=example.tools)
        assert item.input_ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_a_template_whose_prompts_are_not_prefixes_is_still_refused(tokenizer_dir):
    from specialize.data.formats import Example
    from specialize.data.templates import Template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = Template("tokenizer", "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
                                     "{%- if add_generation_prompt %}{{ 'bot: ' }}{%- endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]
    with pytest.raises(UserError, match="does not render turn 1 as an extension of the previous turns"):
        encode_chat(Example(messages=messages), tokenizer, template)
