"""Structured output and logprobs through `specialize serve`, with the official openai client.

Pinned here: a `json_schema` answer is JSON that the schema allows, greedy, sampled and streamed,
even from an untrained model whose free answer is not JSON at all; a constrained row leaves its
neighbours in the running batch unchanged; a schema the grammar compiler refuses, and every
setting the server cannot honour, is a 400 in OpenAI's error shape; logprobs come in OpenAI's
chat and legacy completions shapes, streamed and not, with the greedy token the likeliest.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from helpers import serving

from specialize.config import ServeConfig
from specialize.generate import Generator
from specialize.serve import create_app
from specialize.serve.constrained import Grammars, json_grammar
from specialize.serve.decode import RunningBatch
from specialize.serve.worker import Job, Sampling

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 8},
                         "days": {"type": "integer", "minimum": 1, "maximum": 9}}}
WEATHER = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


@pytest.fixture(scope="module")
def generator(tiny_llama) -> Generator:
    return Generator.load(tiny_llama)


@pytest.fixture(scope="module")
def client(generator, tiny_llama):
    cfg = ServeConfig(model=str(tiny_llama), model_name="tiny-llama", max_batch_size=4)
    with serving(create_app(generator, cfg), cfg) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_json_schema_answers_are_json_the_schema_allows_greedy_sampled_and_streamed(client):
    free = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=40).choices[0]
    with pytest.raises(ValueError):  # unconstrained, the untrained model writes anything but JSON
        json.loads(free.message.content)

    answers = [client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=60, response_format=WEATHER,
                                              **sampling).choices[0]
               for sampling in ({}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2})]
    for choice in answers:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert ", " in choice.message.content and '": ' in choice.message.content  # json.dumps' separators

    stream = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=60, response_format=WEATHER,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answers[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_clients_own_parse_helpers_get_their_pydantic_model(client):
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=9)

    parsed = client.chat.completions.parse(model="tiny-llama", messages=ASK, response_format=Weather, max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    with client.chat.completions.stream(model="tiny-llama", messages=ASK, response_format=Weather,
                                        max_tokens=60) as stream:
        for _ in stream:
            pass
        assert stream.get_final_completion().choices[0].message.parsed == parsed.choices[0].message.parsed


def test_json_object_answers_are_a_json_object(client):
    choice = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=120,
                                            response_format={"type": "json_object"}).choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":  # an untrained model may still be inside a long string at the budget
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_constrained_row_leaves_its_neighbours_answers_unchanged(generator):
    ids = generator.text_ids("Return a new list of the items in the iterable, sorted")
    plain = Job(ids, 20, Sampling.of(0.0, None, [], None))
    constrained = Job(ids, 60, Sampling.of(0.0, None, [], None),
                      constraint=Grammars(generator).constraint(json_grammar(SCHEMA), "response_format"))
    batch, done = RunningBatch(generator), {}
    ended = batch.admit([plain, constrained])
    while True:
        done.update(dict(ended))
        if not batch:
            break
        ended = batch.step()
    alone = generator.generate_ids([ids], max_new_tokens=20)[0]
    assert done[plain].text == alone.text
    jsonschema.validate(json.loads(done[constrained].text), SCHEMA)


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format", "frobnicate"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "use tools"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools are given"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "only allowed when tools are given"),
])
def test_what_the_server_cannot_honour_is_a_400_in_openai_shape(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=5, **extra)
    error = raised.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"]


def test_completions_refuse_what_they_cannot_honour(client):
    for extra, param in (({"logprobs": 6}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of")):
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="tiny-llama", prompt="The", max_tokens=3, **extra)
        assert raised.value.body["param"] == param


def test_chat_logprobs_streamed_and_not_name_each_token_with_the_greedy_one_likeliest(client):
    choice = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=12, logprobs=True,
                                            top_logprobs=3).choices[0]
    content = choice.logprobs.content
    assert len(content) == 12 and "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob

    stream = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=12, logprobs=True,
                                            top_logprobs=3, stream=True)
    carrying = [c for c in stream if c.choices and c.choices[0].logprobs]
    streamed = [t for c in carrying for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    assert len(carrying) > 1  # they come with their pieces, not all at the end

    plain = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=12).choices[0]
    assert plain.logprobs is None and plain.message.content == choice.message.content


def test_completions_logprobs_in_the_legacy_shape(client):
    choice = client.completions.create(model="tiny-llama", prompt="Open the file", max_tokens=6, logprobs=2).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)


def test_a_bad_message_shape_is_a_400_naming_the_field(client):
    base = client.base_url
    for messages, param in (([{"role": "tool", "content": "5"}], "messages.0"),
                            ([{"role": "user", "content": None}], "messages.0.content"),
                            ([{"role": "user", "content": "hi", "tool_calls": [
                                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
                             "messages.0")):
        response = httpx.post(f"{base}chat/completions", json={"messages": messages}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("family", ["llama3", "qwen2.5", "gemma2"])
def test_real_family_tokenizers_are_constrained_or_refused(tmp_path, tokenizer_dir, family):
    """Special tokens, a BOS-adding tokenizer, several stop tokens: the grammar holds; Gemma 2 (one request at a
    time, sliding-window cache) refuses rather than ignoring the request."""
    from families import BY_NAME, save_family

    path = save_family(BY_NAME[family], tokenizer_dir, tmp_path / family)
    generator = Generator.load(path)
    generator.model.config.max_position_embeddings = 2048  # rotary positions: room for Qwen's tool prompt
    cfg = ServeConfig(model=str(path), model_name=family)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    with serving(create_app(generator, cfg), cfg) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        requests = [{"response_format": WEATHER}, {"logprobs": True}]
        if family == "qwen2.5":  # its own template renders tools
            requests.append({"tools": tools, "tool_choice": "required", "parallel_tool_calls": False,
                             "max_tokens": 120})
        for extra in requests:
            if family == "gemma2":
                with pytest.raises(openai.BadRequestError) as raised:
                    client.chat.completions.create(model=family, messages=ASK, **({"max_tokens": 60} | extra))
                assert raised.value.body["code"] == "unsupported"
                continue
            response = client.chat.completions.create(model=family, messages=ASK, **({"max_tokens": 60} | extra))
            choice = response.choices[0]
            if "response_format" in extra:
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            elif "tools" in extra:
                assert choice.finish_reason == "tool_calls"
                [made] = choice.message.tool_calls
                jsonschema.validate(json.loads(made.function.arguments), SCHEMA)
            else:
                tokens = [t.token for t in choice.logprobs.content]
                assert len(tokens) == response.usage.completion_tokens > 0
                assert "".join(tokens) == choice.message.content
