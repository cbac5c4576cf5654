"""Tool calling through `specialize serve`, with the official openai client.

Pinned here: `tool_choice` `required` or a named function makes even an untrained model answer
with calls the client parses (plain and streamed), whose arguments match the tool's schema, one
call unless parallel; malformed tools and tool messages are a 400 in OpenAI's shape, as is a
template that cannot render tools. End to end, a tiny model fine-tuned on OpenAI-format
tool-calling chats calls the tool under `auto`, streams the same call, continues after the tool's
result, answers in text under `none`, and writes JSON that a `json_schema` allows.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch
from helpers import corpus, save_llama, serving, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig

from specialize.config import FinetuneConfig, ServeConfig
from specialize.data.templates import ours
from specialize.finetune import finetune
from specialize.generate import Generator
from specialize.serve import create_app
from specialize.serve.constrained import _first_line
from specialize.serve.decode import RunningBatch, _end_after
from specialize.serve.tools import ToolStream, reply
from specialize.serve.worker import Job, Sampling
from specialize.tokenizer import train_bpe
from specialize.tools import TOOL_CALL_CLOSE, render_tool_calls, tools_system_text

CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 10}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                           "parameters": CITY}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def call(name: str, city: str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}


def tiny_base(path, texts):
    """A 2-layer Llama with a 1,024-token context and a BPE that knows the tool prompt (quicker training)."""
    tokenizer = train_bpe(corpus() + texts, vocab_size=2048)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def client_for(generator, name: str):
    cfg = ServeConfig(model=name, model_name=name, max_batch_size=4)
    return serving(create_app(generator, cfg), cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    texts = [tools_system_text(TOOLS), render_tool_calls([call("get_weather", "Paris")])] * 100
    return tiny_base(tmp_path_factory.mktemp("tools-base"), texts)


@pytest.fixture(scope="module")
def untrained(base):
    """The untrained base, prompted with our chatml template (which renders tools)."""
    generator = Generator.load(base)
    generator.template = ours("chatml", generator.tokenizer)
    with client_for(generator, "untrained") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_required_gives_parsed_calls_whose_arguments_match_the_schema(untrained):
    # Parallel calls allowed: an untrained model may go on calling until its budget; every whole call is valid.
    many = untrained.chat.completions.create(model="untrained", messages=ASK, tools=TOOLS, tool_choice="required",
                                             max_tokens=100).choices[0]
    assert many.message.tool_calls and many.finish_reason in ("tool_calls", "length")
    assert len({c.id for c in many.message.tool_calls}) == len(many.message.tool_calls)
    for c in many.message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(c.function.arguments), CITY)

    one = dict(model="untrained", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
               max_tokens=60)
    choice = untrained.chat.completions.create(**one).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == many.message.tool_calls[0].function.name  # greedy: same start

    stream = untrained.chat.completions.create(**one, stream=True)
    chunks = list(stream)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(i, c.function.name, c.function.arguments) for i, c in enumerate(choice.message.tool_calls)]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_function_without_parallel_calls_is_exactly_one_call_to_it(untrained):
    for temperature in (0.0, 1.0):
        choice = untrained.chat.completions.create(
            model="untrained", messages=ASK, tools=TOOLS, max_tokens=60, parallel_tool_calls=False, seed=3,
            temperature=temperature, tool_choice={"type": "function", "function": {"name": "get_time"}}).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), CITY)


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools", "must be a JSON schema of type 'object'"),
    ({"tools": TOOLS + [TOOLS[0]]}, "tools", "duplicate function name 'get_weather'"),
    ({"tools": []}, "tools", "at least one tool"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools",
     "129 tools: at most 128 are allowed"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 5}}}]},
     "tools", "not a valid JSON schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "book"}}}, "tool_choice",
     "'book', which is not in tools"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]},
     "messages.1.tool_call_id", "must answer a tool call"),
])
def test_malformed_tools_and_tool_messages_are_a_400_in_openai_shape(untrained, extra, param, words):
    with pytest.raises(openai.BadRequestError) as raised:
        untrained.chat.completions.create(model="untrained", **({"messages": ASK} | extra), max_tokens=5)
    error = raised.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_a_template_that_cannot_render_tools_is_a_400(base):
    generator = Generator.load(base)  # no chat template: prompted with our `qa` template
    with client_for(generator, "plain") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="plain", messages=ASK, tools=TOOLS, max_tokens=5)
        assert raised.value.body["param"] == "tools" and "cannot render" in raised.value.body["message"]


def test_auto_with_a_json_response_format_answers_json_or_calls(untrained):
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
              "properties": {"ok": {"type": "boolean"}}}
    for seed in (1, 2, 3):
        choice = untrained.chat.completions.create(
            model="untrained", messages=ASK, tools=TOOLS, max_tokens=80, temperature=1.0, seed=seed,
            parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        else:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)


HTML = 'Posting.\n<tool_call>\n{"name": "post", "arguments": {"html": "a </tool_call> b"}}\n</tool_call> ok' 
SAMPLE = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>')


@pytest.mark.parametrize("text", [SAMPLE, "  plain <tool answer, no call  ", "a <tool_call>not json</tool_call> b",
                                  'x <tool_call>\n{"name": "get_time", "arguments": {}}',
                                  ' {"name": "get_time", "parameters": {"city": "Oslo"}}', '{"ok": true} ',
                                  HTML, ' {"name": "Alice", "age": 30}', "x " + SAMPLE + " y"])
def test_streamed_pieces_join_to_the_unstreamed_answer_and_never_show_part_of_a_tag(text):
    content, calls = reply(text, parse_calls=True)
    for size in (1, 2, 5, len(text)):
        stream, events = ToolStream(), []
        for i in range(0, len(text), size):
            events += stream.feed(text[i: i + size])
        events += stream.finish()
        shown = "".join(e for e in events if isinstance(e, str))
        assert shown == (content or "")
        assert [e["function"] for e in events if isinstance(e, dict)] == [c["function"] for c in calls]
        if calls:  # a text piece is never a prefix of the tag (it would leak, then the call follow)
            assert not any(isinstance(e, str) and "<tool" in e for e in events)


def test_a_call_to_a_tool_not_offered_stays_content_streamed_or_not():
    text = "Sure.\n" + render_tool_calls([call("book", "Oslo"), call("get_time", "Oslo")])
    content, calls = reply(text, frozenset({"get_time", "get_weather"}))
    assert content == "Sure.\n" + render_tool_calls([call("book", "Oslo")])
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    assert reply('{"name": "book", "arguments": {}}', frozenset({"get_time"})) == ('{"name": "book", "arguments": {}}', [])
    for size in (1, 7, len(text)):
        stream, events = ToolStream(frozenset({"get_time", "get_weather"})), []
        for i in range(0, len(text), size):
            events += stream.feed(text[i: i + size])
        events += stream.finish()
        assert "".join(e for e in events if isinstance(e, str)) == content
        assert [e["function"] for e in events if isinstance(e, dict)] == [c["function"] for c in calls]


def test_a_single_call_ends_where_its_block_ends_not_at_a_tag_inside_an_argument():
    end = len(HTML) - len(" ok")
    assert _end_after(HTML, TOOL_CALL_CLOSE, True) == end
    for cut in range(len(HTML)):  # while generating: never before the block's end
        assert _end_after(HTML[:cut], TOOL_CALL_CLOSE, False) == (end if cut >= end else None)
    assert _end_after("a <tool_call>not json</tool_call> b", TOOL_CALL_CLOSE, False) == len("a <tool_call>not json</tool_call>")


def test_llguidance_panics_are_not_shown_to_the_client():
    assert _first_line("panic: assertion failed: self.num_states < 1 << 20\nbacktrace") == "the grammar is too large"
    assert _first_line("failed to compile JSON schema: Invalid type: frobnicate\n at ...") == "Invalid type: frobnicate"


def test_end_after_ends_the_answer_at_the_first_call_keeping_it(tmp_path, tokenizer_dir):
    """parallel_tool_calls false under auto: the answer ends once it holds `</tool_call>` (here: any text)."""
    generator = Generator.load(save_llama(tmp_path / "llama", tokenizer_dir))
    ids = generator.text_ids("Return a new list of the items in the iterable, sorted")
    free = generator.generate_ids([ids], max_new_tokens=30)[0].text
    marker = free[len(free) // 3: len(free) // 3 + 3]
    job = Job(ids, 30, Sampling.of(0.0, None, [], None), end_after=marker)
    batch = RunningBatch(generator)
    ended = batch.admit([job])
    while not ended:
        ended = batch.step()
    [(_, completion)] = ended
    assert completion.text == free[: free.index(marker) + len(marker)] and completion.finish_reason == "stop"


# ------------------------------------------------------------------ end to end: a model trained to call tools

RESULT = "sunny, 21 C"
REPLY = "It is sunny in Paris, 21 C."
CHATS = [
    ASK + [{"role": "assistant", "content": None, "tool_calls": [call("get_weather", "Paris")]}],
    [{"role": "user", "content": "What is the weather in Oslo?"},
     {"role": "assistant", "content": None, "tool_calls": [call("get_weather", "Oslo")]}],
    [{"role": "user", "content": "What time is it in Tokyo?"},
     {"role": "assistant", "content": None, "tool_calls": [call("get_time", "Tokyo")]}],
    ASK + [{"role": "assistant", "content": None, "tool_calls": [call("get_weather", "Paris")]},
           {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
           {"role": "assistant", "content": REPLY}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    data = write_jsonl(tmp_path_factory.mktemp("tool-chats") / "chats.jsonl",
                       [{"messages": m, "tools": TOOLS} for m in CHATS])
    run = finetune(FinetuneConfig(base=str(base), data=[str(data)], out=tmp_path_factory.mktemp("runs") / "tooly",
                                  template="chatml", epochs=100, learning_rate=1e-2, micro_batch_size=8,
                                  warmup_steps=0, eval_fraction=0, progress=False))
    with client_for(Generator.load(str(run)), "tooly") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_a_model_trained_on_tool_chats_calls_continues_and_obeys_tool_choice(trained):
    choice = trained.chat.completions.create(model="tooly", messages=ASK, tools=TOOLS, max_tokens=40).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [made] = choice.message.tool_calls
    assert (made.function.name, json.loads(made.function.arguments)) == ("get_weather", {"city": "Paris"})

    chunks = list(trained.chat.completions.create(model="tooly", messages=ASK, tools=TOOLS, max_tokens=40,
                                                  stream=True))
    [delta] = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert (delta.index, delta.function.name, delta.function.arguments) == (0, "get_weather", made.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # no piece of the tag leaked as text

    # The client sends the call back with the tool's result: the model answers from it.
    follow = ASK + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": made.id, "content": RESULT}]
    answer = trained.chat.completions.create(model="tooly", messages=follow, tools=TOOLS, max_tokens=40).choices[0]
    assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == (REPLY, None, "stop")

    single = trained.chat.completions.create(model="tooly", messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                             max_tokens=40).choices[0]
    assert [(c.function.name, c.function.arguments) for c in single.message.tool_calls] == \
        [(made.function.name, made.function.arguments)]

    plain = trained.chat.completions.create(model="tooly", messages=ASK, tools=TOOLS, tool_choice="none",
                                            max_tokens=40).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")
    assert plain.message.content and "<tool_call>" not in plain.message.content

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "sunny"],
              "properties": {"city": {"type": "string", "maxLength": 10}, "sunny": {"type": "boolean"}}}
    structured = trained.chat.completions.create(
        model="tooly", messages=ASK, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}).choices[0]
    assert structured.finish_reason == "stop"
    jsonschema.validate(json.loads(structured.message.content), schema)
