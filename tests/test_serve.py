"""serve: the official openai client against a real uvicorn server running a tiny fine-tuned run.

The run is fine-tuned until it answers the 8 QA8 questions exactly, so every answer the
server gives can be checked against the trained answer and against `Generator.generate`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from helpers import QA8, serving, short_context_gpt2

from specialize.config import ServeConfig
from specialize.errors import UserError
from specialize.generate import Generator
from specialize.serve import create_app, serve

ROWS = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]
QUESTIONS = [r["question"] for r in ROWS]
ANSWERS = [r["answer"] for r in ROWS]


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def run(qa8_run) -> Path:
    return qa8_run


@pytest.fixture(scope="module")
def generator(run) -> Generator:
    generator = Generator.load(run)
    assert [c.text for c in generator.generate([ask(q) for q in QUESTIONS])] == ANSWERS  # the fixture learned
    return generator


@pytest.fixture(scope="module")
def url(generator, run) -> Iterator[str]:
    with serving(create_app(generator, ServeConfig(model=str(run)))) as url:
        yield url


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_run_by_its_folder_name(client):
    assert [m.id for m in client.models.list().data] == ["qa8"]
    assert client.models.retrieve("qa8").id == "qa8"


def test_chat_completion_is_the_trained_answer_and_equals_generate(client, generator):
    for question, answer in zip(QUESTIONS[:3], ANSWERS):
        response = client.chat.completions.create(model="qa8", messages=ask(question))
        expected = generator.generate([ask(question)])[0]
        assert response.choices[0].message.content == answer == expected.text
        assert response.choices[0].message.role == "assistant"
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.prompt_tokens == len(generator.prompt_ids(ask(question))) == expected.prompt_tokens
        assert response.usage.completion_tokens == expected.completion_tokens
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_completion_equals_the_non_streamed_one(client, url, generator):
    chunks = list(client.chat.completions.create(model="qa8", messages=ask(QUESTIONS[4]), stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWERS[4] == generator.generate([ask(QUESTIONS[4])])[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0
    raw = httpx.post(url + "/v1/chat/completions", json={"messages": ask(QUESTIONS[4]), "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions_take_raw_text_without_the_template(client, generator):
    prompt = generator.template.render(generator.tokenizer, ask(QUESTIONS[1]), add_generation_prompt=True)
    response = client.completions.create(model="qa8", prompt=prompt, max_tokens=64)
    assert response.choices[0].text == ANSWERS[1] and response.choices[0].finish_reason == "stop"
    short = client.completions.create(model="qa8", prompt=prompt, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    streamed = client.completions.create(model="qa8", prompt=prompt, max_tokens=64, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ANSWERS[1]


def test_stop_strings_end_the_answer_streamed_or_not(client):
    answer = client.chat.completions.create(model="qa8", messages=ask("What do bees make?"), stop="honey")
    assert answer.choices[0].message.content == "Bees make " and answer.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="qa8", messages=ask("What do bees make?"), stop=["ho", "xyz"],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Bees make "  # no half stop string


def test_max_tokens_gives_finish_reason_length(client):
    response = client.chat.completions.create(model="qa8", messages=ask(QUESTIONS[0]), max_tokens=2)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 2
    assert ANSWERS[0].startswith(response.choices[0].message.content)


def test_seeded_sampling_is_reproducible(client):
    def sample() -> str:
        return client.chat.completions.create(model="qa8", messages=ask("Tell me something."), temperature=1.5,
                                              top_p=0.95, seed=7, max_tokens=12).choices[0].message.content

    assert sample() == sample()


def prefilling(kwargs) -> bool:
    """Whether a model call starts rows (its cache is empty) rather than decoding one more token."""
    return kwargs["cache"].get_seq_length() == 0


def test_64_concurrent_clients_all_get_their_answers_in_batches(client, generator, monkeypatch):
    calls = []  # (rows, prefilling) of every model call
    original = generator.model.forward
    monkeypatch.setattr(generator.model, "forward",
                        lambda **kw: calls.append((len(kw["input_ids"]), prefilling(kw))) or original(**kw))

    def one(i: int) -> str:
        messages = ask(QUESTIONS[i % 8])
        if i % 8 == 7:  # a few streaming clients among the batched ones
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="qa8", messages=messages, stream=True))
        return client.chat.completions.create(model="qa8", messages=messages).choices[0].message.content

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one, range(64)))
    assert answers == [ANSWERS[i % 8] for i in range(64)]
    assert max(rows for rows, _ in calls) > 1  # requests were generated together
    assert sum(prefill for _, prefill in calls) < 64  # and waiting ones joined the batch together


def test_a_full_queue_answers_503_in_openai_shape_and_the_server_recovers(generator, run, monkeypatch):
    original = generator.model.forward  # each request's prefill takes 0.5 s
    monkeypatch.setattr(generator.model, "forward", lambda **kw: (prefilling(kw) and time.sleep(0.5)) or original(**kw))
    app = create_app(generator, ServeConfig(model=str(run), max_queue=1, max_batch_size=1))
    together = threading.Barrier(8)
    with serving(app) as url:
        def post(question: str) -> httpx.Response:
            return httpx.post(url + "/v1/chat/completions", json={"messages": ask(question)}, timeout=60)

        def post_together(question: str) -> httpx.Response:
            together.wait(timeout=10)  # all 8 at once: 1 generating, 1 waiting, 6 turned away
            return post(question)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post_together, QUESTIONS))
        busy = [r for r in responses if r.status_code == 503]
        served = [(q, r) for q, r in zip(QUESTIONS, responses) if r.status_code == 200]
        assert busy and served and len(busy) + len(served) == 8
        error = busy[0].json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_full"
        assert busy[0].headers["retry-after"]
        assert all(r.json()["choices"][0]["message"]["content"] == ANSWERS[QUESTIONS.index(q)] for q, r in served)
        assert httpx.get(url + "/health").json()["status"] == "ok"
        assert post(QUESTIONS[6]).json()["choices"][0]["message"]["content"] == ANSWERS[6]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[]", None),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user"}]}', "messages.0.content"),
    (b'{"messages": [{"content": "hi"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": 42}]}', "messages.0.content"),
    (b'{"messages": "hi"}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "' + b"x" * 65 + b'"}', "stop"),
])
def test_bad_requests_get_a_400_in_openai_error_shape(url, body, param):
    response = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert "Traceback" not in response.text


def test_unknown_model_and_route_get_404_json(client, url):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ask(QUESTIONS[0]))
    assert httpx.get(url + "/v1/nothing").json()["error"]["message"]


def test_internal_errors_reach_clients_as_generic_500_and_the_log_as_tracebacks(generator, run, monkeypatch, caplog):
    def broken(**kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(generator.model, "forward", broken)
    with serving(create_app(generator, ServeConfig(model=str(run)))) as url:
        response = httpx.post(url + "/v1/chat/completions", json={"messages": ask(QUESTIONS[0])})
        streamed = httpx.post(url + "/v1/chat/completions", json={"messages": ask(QUESTIONS[0]), "stream": True})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert '"error"' in streamed.text
    for text in (response.text, streamed.text):
        assert "secret internals" not in text and "Traceback" not in text
    assert "secret internals" in caplog.text  # the traceback is in the server log


def test_api_key_is_required_on_every_request(generator, run, monkeypatch):
    monkeypatch.delenv("SPECIALIZE_API_KEY", raising=False)
    with serving(create_app(generator, ServeConfig(model=str(run), api_key="sk-test-key"))) as url:
        for key in ("wrong", "sk-test-ke"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 401
        assert httpx.get(url + "/health").json()["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="sk-test-key", max_retries=0)
        assert keyed.chat.completions.create(model="qa8", messages=ask(QUESTIONS[3])).choices[0].message.content \
            == ANSWERS[3]
    monkeypatch.setenv("SPECIALIZE_API_KEY", "sk-from-env")
    with serving(create_app(generator, ServeConfig(model=str(run)))) as url:
        assert httpx.get(url + "/health").status_code == 401
        assert httpx.get(url + "/health", headers={"Authorization": "Bearer sk-from-env"}).status_code == 200


def test_logs_have_sizes_and_timings_but_no_contents_or_key(generator, run, caplog, monkeypatch):
    monkeypatch.delenv("SPECIALIZE_API_KEY", raising=False)
    caplog.set_level(logging.INFO, logger="specialize")
    secret = "What colour is the sky on a clear day?"
    for log_contents in (False, True):
        caplog.clear()
        app = create_app(generator, ServeConfig(model=str(run), api_key="sk-log-key", log_contents=log_contents))
        with serving(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="sk-log-key", max_retries=0)
            client.chat.completions.create(model="qa8", messages=ask(secret))
            list(client.chat.completions.create(model="qa8", messages=ask(secret), stream=True))
        assert "sk-log-key" not in caplog.text
        lines = [r.getMessage() for r in caplog.records if "POST /v1/chat/completions 200" in r.getMessage()]
        assert len(lines) == 2 and all("prompt=" in line and "completion=" in line for line in lines)
        assert (secret in caplog.text) == log_contents and (ANSWERS[2] in caplog.text) == log_contents


def test_serve_reports_a_busy_port_as_a_user_error():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        with pytest.raises(UserError, match="cannot listen"):
            serve(ServeConfig(model="unused", port=busy.getsockname()[1]))
    assert ServeConfig().host == "127.0.0.1"  # never exposed to the network unless asked


def test_api_key_flag_warns_and_never_echoes_the_key(monkeypatch):
    from typer.testing import CliRunner

    import specialize.serve
    from specialize.cli import app

    started: list[ServeConfig] = []
    monkeypatch.setattr(specialize.serve, "serve", started.append)
    result = CliRunner().invoke(app, ["serve", "--model", "runs/x", "--api-key", "sk-secret-123"])
    assert result.exit_code == 0, result.output
    assert started[0].api_key == "sk-secret-123"
    assert "prefer the SPECIALIZE_API_KEY environment variable" in result.output
    assert "sk-secret-123" not in result.output


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@contextmanager
def held_worker(generator, monkeypatch):
    """Make the first model call wait until the test releases it (so others can queue up).

    Yields (calls, entered, release): calls are (width, rows) of every prefill, the model call
    that starts rows.
    """
    original = generator.model.forward
    calls, entered, release = [], threading.Event(), threading.Event()

    def forward(**kwargs):
        if prefilling(kwargs):
            calls.append(tuple(kwargs["input_ids"].shape[::-1]))
        entered.set()
        assert release.wait(timeout=30)
        return original(**kwargs)

    monkeypatch.setattr(generator.model, "forward", forward)
    try:
        yield calls, entered, release
    finally:
        release.set()


def test_requests_that_fit_alone_run_together_each_within_its_own_context(tokenizer_dir, monkeypatch):
    generator = short_context_gpt2(tokenizer_dir)
    texts = {len(generator.tokenizer(t)["input_ids"]): t for t in (" ".join(["the"] * k) for k in range(1, 60))}
    a, b = texts[28], texts[2]  # A: 28 + 4 tokens, B: 2 + 30: each fits the context of 32, together 28 + 30 do not
    alone = [generator.generate_ids([generator.tokenizer(p)["input_ids"]], max_new_tokens=n)[0]
             for p, n in ((a, 4), (b, 30))]
    app = create_app(generator, ServeConfig(model_name="short", max_batch_size=8))
    with held_worker(generator, monkeypatch) as (calls, entered, release), serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def complete(prompt: str, max_tokens: int):
            return client.completions.create(model="short", prompt=prompt, max_tokens=max_tokens).choices[0]

        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(complete, b, 1)  # holds the worker while A and B queue up together
            assert entered.wait(timeout=10)
            answers = [pool.submit(complete, a, 4)]
            wait_until(lambda: app.state.worker.waiting == 1)  # A is older than B
            answers.append(pool.submit(complete, b, 30))
            wait_until(lambda: app.state.worker.waiting == 2)
            release.set()
            first.result()
            answers = [f.result() for f in answers]  # before the fix: both failed with a 500 (IndexError)
        assert httpx.get(url + "/health").status_code == 200
    assert [(c.text, c.finish_reason) for c in answers] == [(c.text, c.finish_reason) for c in alone]
    # Before continuous batching A and B ran apart (a batch was as wide as its longest prompt and
    # ran to its largest budget); now each row has its own positions, so they share the batch.
    assert calls == [(2, 1), (28, 2)]


def test_max_tokens_above_the_server_cap_is_a_400(generator, run):
    assert ServeConfig().max_new_tokens == 1024
    longest = max(range(len(QUESTIONS)), key=lambda i: generator.generate([ask(QUESTIONS[i])])[0].completion_tokens)
    assert generator.generate([ask(QUESTIONS[longest])])[0].completion_tokens > 8
    with serving(create_app(generator, ServeConfig(model=str(run), max_new_tokens=8))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="qa8", messages=ask(QUESTIONS[0]), max_tokens=9)
        assert refused.value.param == "max_tokens" and refused.value.code == "invalid_value"
        assert "limit of 8 tokens" in refused.value.message
        capped = client.chat.completions.create(model="qa8", messages=ask(QUESTIONS[longest]))  # default: the cap
        assert capped.usage.completion_tokens == 8 and capped.choices[0].finish_reason == "length"
        assert client.chat.completions.create(model="qa8", messages=ask(QUESTIONS[longest]),
                                              max_tokens=8).choices[0].message.content \
            == capped.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_queued_frees_its_slot_and_is_never_generated(generator, run, monkeypatch,
                                                                                  stream):
    app = create_app(generator, ServeConfig(model=str(run), max_batch_size=1))
    worker = app.state.worker
    with held_worker(generator, monkeypatch) as (calls, entered, release), serving(app) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v1/chat/completions", json={"messages": ask(QUESTIONS[0])},
                                timeout=60)
            assert entered.wait(timeout=10)
            body = json.dumps({"messages": ask(QUESTIONS[1]), "stream": stream}).encode()
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as leaving:  # a client that times out and closes
                leaving.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                wait_until(lambda: worker.waiting == 1)
            wait_until(lambda: worker.waiting == 0)  # its queue slot is free while the model is still busy
            assert worker.dropped == 1 and len(calls) == 1
            release.set()
            assert first.result().json()["choices"][0]["message"]["content"] == ANSWERS[0]
    assert len(calls) == 1  # the model never answered the client that left


def test_a_worker_whose_device_broke_fails_health_and_refuses_requests(generator, run, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    usable = [True]
    monkeypatch.setattr(generator.model, "forward", broken)
    monkeypatch.setattr("specialize.serve.worker.device_usable", lambda device: usable[0])
    with serving(create_app(generator, ServeConfig(model=str(run)))) as url:
        def post() -> httpx.Response:
            return httpx.post(url + "/v1/chat/completions", json={"messages": ask(QUESTIONS[0])})

        assert post().status_code == 500
        assert httpx.get(url + "/health").status_code == 200  # a failed request alone is no broken server
        usable[0] = False  # as after a CUDA device-side assert: every later call on the device fails
        assert post().status_code == 500
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unusable"
        assert "device-side assert" in health.json()["reason"]
        refused = post()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_unusable"


def test_n_may_be_null_and_streamed_usage_is_null_until_the_last_chunk(client, url):
    answer = client.chat.completions.create(model="qa8", messages=ask(QUESTIONS[0]), n=None,
                                            stop=["zq1", "zq2", "zq3", "zq4"])  # 4 stop strings are allowed
    assert answer.choices[0].message.content == ANSWERS[0]
    for route, body in (("/v1/chat/completions", {"messages": ask(QUESTIONS[4])}),
                        ("/v1/completions", {"prompt": QUESTIONS[4], "max_tokens": 5})):
        for include_usage in (True, False):
            raw = httpx.post(url + route, json=body | {"n": None, "stream": True,
                                                       "stream_options": {"include_usage": include_usage}})
            events = [json.loads(line.removeprefix("data: ")) for line in raw.text.splitlines()
                      if line.startswith("data: {")]
            if include_usage:  # OpenAI's shape: "usage": null on every chunk but the last, which has no choices
                assert all("usage" in e and e["usage"] is None for e in events[:-1]) and len(events) > 2
                assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
            else:
                assert all("usage" not in e for e in events)
