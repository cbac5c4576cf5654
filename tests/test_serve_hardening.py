"""serve under careless or hostile clients: huge bodies, slow clients, extreme sampling values.

Each test drives a real uvicorn server (with the server settings `specialize serve` uses) over
raw sockets or httpx on 127.0.0.1, with bounded counts and times.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

import helpers
from specialize.config import ServeConfig
from specialize.generate import Generator
from specialize.serve import create_app

HELLO = [{"role": "user", "content": "hello there"}]


def config(**settings) -> ServeConfig:
    """A ServeConfig with `settings`; those ServeConfig does not declare yet are set on the copy."""
    known = {k: v for k, v in settings.items() if k in ServeConfig.model_fields}
    return ServeConfig(model_name="tiny", **known).model_copy(update=settings)


@pytest.fixture(scope="module")
def generator(tiny_llama) -> Generator:
    return Generator.load(tiny_llama)


@contextmanager
def serving(generator: Generator, cfg: ServeConfig, app=None) -> Iterator[tuple[str, int]]:
    """`specialize serve`'s app (or `app`) and uvicorn settings in a background thread; yields (host, port)."""
    with helpers.serving(app or create_app(generator, cfg), cfg) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)


def url(address: tuple[str, int], path: str) -> str:
    return f"http://{address[0]}:{address[1]}{path}"


def read_response(conn: socket.socket, seconds: float = 5) -> bytes:
    """Everything the server sends until it closes the connection (or `seconds` pass)."""
    conn.settimeout(seconds)
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = conn.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server kept the connection open; got {data[:200]!r}")


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# ----------------------------------------------------------------------------- item 1: body size

def test_a_body_over_the_cap_is_refused_with_413_before_it_is_read(generator):
    with serving(generator, config(max_body_bytes=64 * 1024)) as address:
        for declared in (50 * 1024 * 1024, 64 * 1024 + 1):  # the 50 MB, and one byte over
            with socket.create_connection(address) as conn:
                start = time.monotonic()
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n{\"messages\": [" % declared)  # and then nothing more
                status, body = status_and_json(read_response(conn))
                assert time.monotonic() - start < 2  # answered (and closed) without waiting for the body
            assert status == 413
            assert body["error"] == {"message": f"the request body ({declared:,} bytes) is larger than this server's "
                                                "limit of 65,536 bytes", "type": "invalid_request_error",
                                     "param": None, "code": "request_too_large"}
        assert httpx.post(url(address, "/v1/chat/completions"), json={"messages": HELLO, "max_tokens": 2}) \
            .status_code == 200  # a body within the cap is served as before


def test_a_chunked_body_is_counted_while_it_arrives_and_refused_once_over_the_cap(generator):
    with serving(generator, config(max_body_bytes=64 * 1024)) as address:
        with socket.create_connection(address) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 16384
            for _ in range(5):  # 80 KiB in chunks of 16: over the cap at the fifth, with no end in sight
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status, body = status_and_json(read_response(conn))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert body["error"]["message"] == "the request body (over 65,536 bytes) is larger than this server's limit " \
                                       "of 65,536 bytes"


def test_health_and_other_clients_stay_fast_while_a_large_body_is_handled(generator):
    # 3.9 MB of tiny messages, under the default 4 MiB cap: parsing, rendering and tokenising it
    # took seconds in the event loop, and /health (and every other client) waited for it.
    n = 3_900_000 // len(json.dumps({"role": "user", "content": "a"}) + ", ")
    big = json.dumps({"messages": [{"role": "user", "content": "a"}] * n, "max_tokens": 1}).encode()
    assert 3_500_000 < len(big) < 4 * 1024 * 1024
    with serving(generator, config()) as address:
        latencies, done = [], threading.Event()

        def probe() -> None:
            while not done.is_set():
                start = time.perf_counter()
                assert httpx.get(url(address, "/health"), timeout=30).status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

        with ThreadPoolExecutor(1) as pool:
            prober = pool.submit(probe)
            time.sleep(0.2)
            start = time.perf_counter()
            large = httpx.post(url(address, "/v1/chat/completions"), content=big, timeout=60,
                               headers={"Content-Type": "application/json"})
            seconds = time.perf_counter() - start
            done.set()
            prober.result()
    assert large.status_code == 400 and large.json()["error"]["code"] == "context_length_exceeded"
    assert seconds < 5
    assert len(latencies) > 3 and max(latencies) < 1, latencies


def test_a_prompt_with_more_characters_than_the_context_can_hold_is_refused_before_tokenising(generator,
                                                                                               monkeypatch):
    tokenised = []
    original = generator.tokenizer.__class__.__call__
    monkeypatch.setattr(generator.tokenizer.__class__, "__call__",
                        lambda self, text, **kw: tokenised.append(len(text)) or original(self, text, **kw))
    limit = generator.context_length * 32
    with serving(generator, config()) as address:
        chat = httpx.post(url(address, "/v1/chat/completions"),
                          json={"messages": [{"role": "user", "content": "a" * limit}]})
        text = httpx.post(url(address, "/v1/completions"), json={"prompt": "a" * (limit + 1)})
    assert tokenised == []
    for response, param in ((chat, "messages"), (text, "prompt")):
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == param
        assert f"more than the model's context of {generator.context_length} tokens can hold" in error["message"]


# ----------------------------------------------------------------------------- item 7: sampling values

@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e-6])
def test_a_tiny_temperature_is_greedy_instead_of_a_500(generator, temperature):
    greedy = generator.generate([HELLO], max_new_tokens=8)[0].text
    assert generator.generate([HELLO], max_new_tokens=8, temperature=temperature)[0].text == greedy  # the CLI's path
    with serving(generator, config()) as address:
        for stream in (False, True):
            response = httpx.post(url(address, "/v1/chat/completions"),
                                  json={"messages": HELLO, "max_tokens": 8, "temperature": temperature,
                                        "stream": stream})
            assert response.status_code == 200, response.text
            if not stream:
                assert response.json()["choices"][0]["message"]["content"] == greedy
            else:
                assert '"error"' not in response.text and response.text.rstrip().endswith("data: [DONE]")


def test_seeds_beyond_64_bits_wrap_around_instead_of_a_500(generator):
    def sample(address, seed: int) -> str:
        response = httpx.post(url(address, "/v1/chat/completions"),
                              json={"messages": HELLO, "max_tokens": 8, "temperature": 1.5, "seed": seed})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    with serving(generator, config()) as address:
        assert sample(address, 2**64 + 7) == sample(address, 7)
        assert sample(address, -1) == sample(address, 2**64 - 1) == sample(address, -(2**64) - 1)
        assert sample(address, 10**30) == sample(address, 10**30 % 2**64)
    seeded = [generator.generate([HELLO], max_new_tokens=8, temperature=1.5, seed=s)[0].text for s in (2**70 + 3, 3)]
    assert seeded[0] == seeded[1]  # the generate CLI's path


# ----------------------------------------------------------------------------- item 8: slow clients

def test_connections_that_never_finish_their_request_are_closed(generator):
    with serving(generator, config(header_timeout_s=0.5, read_timeout_s=0.5)) as address:
        start = time.monotonic()
        silent = [socket.create_connection(address) for _ in range(5)]  # connect, send nothing
        dripping = [socket.create_connection(address) for _ in range(5)]  # headers that never end
        for conn in dripping:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
        stalled = socket.create_connection(address)  # headers complete, body never finishes
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"mess")
        for _ in range(3):  # one more header byte now and then: each byte used to reset the clock
            time.sleep(0.2)
            for conn in dripping:
                conn.sendall(b"X")
        answers = [read_response(conn, seconds=5) for conn in silent + dripping + [stalled]]
        assert time.monotonic() - start < 5
        assert answers[:5] == [b""] * 5  # nothing was asked: closed without a word
        for answer in answers[5:]:  # something was asked: 408 in OpenAI's shape
            status, body = status_and_json(answer)
            assert status == 408 and body["error"]["code"] == "request_timeout"
        for conn in silent + dripping + [stalled]:
            conn.close()
        assert httpx.get(url(address, "/health")).json()["status"] == "ok"  # and the server still serves


def test_slow_answers_and_kept_alive_connections_are_not_cut_by_the_request_deadlines(generator, monkeypatch):
    original = generator.model.forward  # each request's prefill takes 1.5 s
    monkeypatch.setattr(generator.model, "forward",
                        lambda **kw: (kw["cache"].get_seq_length() == 0 and time.sleep(1.5)) or original(**kw))
    with serving(generator, config(header_timeout_s=0.5, read_timeout_s=0.5)) as address:
        with httpx.Client() as client:  # one kept-alive connection for all three requests
            for stream in (False, True, False):
                response = client.post(url(address, "/v1/chat/completions"),
                                       json={"messages": HELLO, "max_tokens": 4, "stream": stream}, timeout=30)
                assert response.status_code == 200 and "error" not in response.text


# ----------------------------------------------------------------------------- item 8: open /health

def test_health_open_answers_the_status_alone_without_the_key(generator, monkeypatch):
    monkeypatch.delenv("SPECIALIZE_API_KEY", raising=False)
    with serving(generator, config(api_key="sk-probe", health_open=True)) as address:
        anonymous = httpx.get(url(address, "/health"))
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
        keyed = httpx.get(url(address, "/health"), headers={"Authorization": "Bearer sk-probe"})
        assert keyed.json() == {"status": "ok", "model": "tiny", "waiting": 0}
        for path in ("/v1/models", "/health/", "/healthz"):
            assert httpx.get(url(address, path)).status_code == 401
        assert httpx.post(url(address, "/health"), json={}).status_code == 401
        assert httpx.post(url(address, "/v1/chat/completions"), json={"messages": HELLO}).status_code == 401
    with serving(generator, config(api_key="sk-probe")) as address:  # closed unless asked
        assert httpx.get(url(address, "/health")).status_code == 401


def test_an_open_health_of_a_broken_worker_reveals_no_reason(generator, monkeypatch):
    monkeypatch.delenv("SPECIALIZE_API_KEY", raising=False)
    cfg = config(api_key="sk-probe", health_open=True)
    app = create_app(generator, cfg)
    app.state.worker.failure = "the cuda:0 device is unusable after AcceleratorError: secret detail"
    with serving(generator, cfg, app) as address:
        anonymous = httpx.get(url(address, "/health"))
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "unusable"}
        keyed = httpx.get(url(address, "/health"), headers={"Authorization": "Bearer sk-probe"})
        assert keyed.status_code == 503 and "secret detail" in keyed.json()["reason"]
