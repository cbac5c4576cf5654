"""serve: sampling settings reach the model — temperature, top_p and seed change what a request gets.

The model is untrained, so its next-token distribution is spread out: a server that dropped
`temperature` (answering greedily) or `seed` would fail here, where a trained model's peaked
distribution could hide it. Same server setup as test_serve.py: real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from helpers import serving
from transformers import AutoModelForCausalLM

from specialize.config import ServeConfig
from specialize.generate import Generator
from specialize.model import load_tokenizer
from specialize.serve import create_app

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def generator(tiny_llama) -> Generator:
    return Generator(AutoModelForCausalLM.from_pretrained(tiny_llama), load_tokenizer(tiny_llama))


@pytest.fixture(scope="module")
def url(generator) -> Iterator[str]:
    with serving(create_app(generator, ServeConfig(model="tiny"))) as url:
        yield url


def complete(url: str, **settings) -> str:
    response = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, **settings}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_temperature_and_seed_decide_the_sample(url, generator):
    greedy = complete(url, temperature=0)
    samples = [complete(url, temperature=1.0, seed=seed) for seed in range(4)]
    assert complete(url, temperature=1.0, seed=2) == samples[2]  # a seed reproduces
    assert len(set(samples)) == 4 and greedy not in samples  # seeds matter, and sampling is not greedy
    assert complete(url, temperature=1.0, top_p=1e-6, seed=0) == greedy  # top_p reaches the model too
    ids = [generator.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    assert samples[1] == generator.generate_ids(ids, max_new_tokens=12, temperature=1.0, seed=1)[0].text
    assert greedy == generator.generate_ids(ids, max_new_tokens=12)[0].text


def test_chat_sampling_follows_the_seed_too(url):
    def chat(**settings) -> str:
        response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 12, **settings})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    samples = [chat(temperature=1.0, seed=seed) for seed in range(3)]
    assert chat(temperature=1.0, seed=0) == samples[0] and len(set(samples)) == 3
    assert chat(temperature=0) not in samples
