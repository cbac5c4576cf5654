"""Continuous batching: requests join and leave the running batch at token boundaries.

Pinned here: every answer equals the one `Generator` gives the request alone, whoever shares
the batch and whenever it joined (greedy, seeded sampling, stop strings, budgets, streaming);
a short answer is handed out while a longer one that started earlier in the same batch goes on.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import save_llama

from specialize.config import ServeConfig
from specialize.generate import Generator
from specialize.serve import create_app
from specialize.serve.decode import RunningBatch, supports
from specialize.serve.worker import Job, Sampling, Worker

PROMPTS = ["The", "Return a new list of the items in the iterable, sorted", "Open the file",
           "A dict subclass for counting hashable objects. It is a collection where elements are stored",
           "json", "Path objects"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tokenizer_dir) -> Generator:
    return Generator.load(save_llama(tmp_path_factory.mktemp("llama"), tokenizer_dir, seed=3))


def job(generator, prompt: str, max_tokens: int, temperature=0.0, top_p=1.0, stop=(), seed=None, on_text=None):
    return Job(generator.text_ids(prompt), max_tokens, Sampling.of(temperature, top_p, list(stop), seed), on_text)


def alone(generator, j: Job):
    s = j.sampling
    return generator.generate_ids([j.prompt_ids], max_new_tokens=j.max_tokens, temperature=s.temperature,
                                  top_p=s.top_p, stop=list(s.stop), seed=s.seed)[0]


def run(batch: RunningBatch, arrivals: dict[int, list[Job]]) -> dict[Job, tuple[int, object]]:
    """Drive the batch by hand: `arrivals[step]` join before that step; returns each job's (end step, answer)."""
    done, step = {}, 0
    while step <= max(arrivals, default=-1) or batch:
        ended = batch.admit(arrivals[step]) if arrivals.get(step) else []
        if batch:
            ended += batch.step()
        for j, completion in ended:
            done[j] = (step, completion)
        step += 1
    return done


def test_the_test_models_cache_can_be_shared_by_rows(generator):
    assert supports(generator.model)


def test_rows_joining_at_different_tokens_answer_as_if_each_ran_alone(generator):
    budgets = [40, 7, 25, 3, 33, 18]
    jobs = [job(generator, p, n) for p, n in zip(PROMPTS, budgets)]
    done = run(RunningBatch(generator), {0: jobs[:2], 1: jobs[2:3], 5: jobs[3:5], 9: jobs[5:]})
    for j in jobs:
        expected = alone(generator, j)
        got = done[j][1]
        assert (got.text, got.finish_reason, got.completion_tokens, got.prompt_tokens) == \
            (expected.text, expected.finish_reason, expected.completion_tokens, expected.prompt_tokens)
        assert got.completion_tokens > 0


def test_a_short_answer_leaves_the_batch_before_a_long_one_that_started_first(generator):
    long, short = job(generator, PROMPTS[1], 40), job(generator, PROMPTS[0], 3)
    batch = RunningBatch(generator)
    done = run(batch, {0: [long], 2: [short]})
    assert done[short][0] < done[long][0]  # handed out while the long one still ran
    assert done[short][0] == 3  # joined at 2 (prefill: token 1, step: token 2), token 3 at the next step
    assert len(batch) == 0 and batch.cache is None


def test_leaving_rows_shrink_the_cache_to_the_longest_remaining_row(generator):
    wide, narrow = job(generator, PROMPTS[3], 3), job(generator, PROMPTS[0], 6)
    batch = RunningBatch(generator)
    batch.admit([wide, narrow])
    batch.step()
    assert batch.mask.shape[1] == len(wide.prompt_ids) + 1  # the wide prompt sets the width
    assert batch.step() and [r.job for r in batch.rows] == [narrow]  # the wide one ended at its 3rd token
    assert batch.mask.shape[1] == len(narrow.prompt_ids) + 2 == batch.cache.get_seq_length()
    assert bool(batch.mask.all())


def test_seeded_sampling_and_stop_strings_per_row_equal_each_alone(generator):
    jobs = [job(generator, PROMPTS[0], 20, temperature=1.3, top_p=0.9, seed=7),
            job(generator, PROMPTS[2], 20),
            job(generator, PROMPTS[4], 20, temperature=0.8, seed=2**64 + 5),
            job(generator, PROMPTS[5], 30, temperature=1.0, seed=11)]
    sampled = alone(generator, jobs[3]).text
    stop = sampled[6:10]  # ends the answer inside its own text (not across the prompt: see the README notes)
    assert not any(PROMPTS[5].endswith(stop[:k]) for k in range(1, len(stop)))
    jobs.append(job(generator, PROMPTS[5], 30, temperature=1.0, seed=11, stop=[stop]))
    done = run(RunningBatch(generator), {0: jobs[:2], 3: jobs[2:]})
    for j in jobs:
        expected = alone(generator, j)
        assert (done[j][1].text, done[j][1].finish_reason) == (expected.text, expected.finish_reason)
    assert done[jobs[-1]][1].finish_reason == "stop" and done[jobs[-1]][1].text == sampled[:sampled.index(stop)]


def test_streamed_rows_stream_exactly_their_answer_and_never_a_stop_string(generator):
    sampled = alone(generator, job(generator, PROMPTS[5], 30, temperature=1.0, seed=11)).text
    stop = sampled[12:15]
    pieces: list[str] = []
    streamed = job(generator, PROMPTS[5], 30, temperature=1.0, seed=11, stop=[stop], on_text=pieces.append)
    other = job(generator, PROMPTS[3], 30)
    done = run(RunningBatch(generator), {0: [other], 1: [streamed]})
    assert "".join(pieces) == done[streamed][1].text == sampled[:sampled.index(stop)]
    assert len(pieces) > 1 and all(stop not in p for p in pieces)


def test_a_cancelled_row_leaves_at_the_next_token_and_its_neighbours_go_on(generator):
    keep, leave = job(generator, PROMPTS[1], 20), job(generator, PROMPTS[3], 20)
    batch = RunningBatch(generator)
    batch.admit([keep, leave])
    batch.step()
    leave.cancelled.set()
    ended = batch.step()
    assert [(j, c.finish_reason, c.completion_tokens) for j, c in ended] == [(leave, "cancelled", 2)]
    done = run(batch, {})
    assert done[keep][1].text == alone(generator, keep).text


def test_concurrent_requests_through_the_worker_equal_generate_alone(generator):
    worker = Worker(generator, max_batch_size=4, max_queue=64)
    try:
        jobs = [job(generator, p, n) for p, n in zip(PROMPTS * 2, [5, 30, 12, 40, 2, 21, 17, 3, 9, 25, 33, 8])]
        with ThreadPoolExecutor(12) as pool:
            futures = list(pool.map(worker.submit, jobs))
        answers = [f.result(timeout=60) for f in futures]
    finally:
        worker.close()
    assert [a.text for a in answers] == [alone(generator, j).text for j in jobs]


def test_a_short_streamed_request_ends_while_a_long_one_started_earlier_still_runs(generator, tokenizer_dir):
    app = create_app(generator, ServeConfig(model_name="llama", max_new_tokens=400))
    from helpers import serving

    with serving(app) as url:
        ended: dict[str, float] = {}
        started = threading.Event()

        def long() -> None:
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={"prompt": PROMPTS[1], "max_tokens": 300, "stream": True}) as r:
                for _ in r.iter_lines():
                    started.set()
            ended["long"] = time.monotonic()

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(long)
            assert started.wait(timeout=30)
            short = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3}, timeout=60)
            ended["short"] = time.monotonic()
            assert app.state.worker.waiting == 0 and not running.done()  # the long one is still generating
            running.result()
        assert short.json()["usage"]["completion_tokens"] == 3
        assert ended["short"] < ended["long"]


def test_a_stop_string_that_begins_in_the_prompt_does_not_cut_the_answer(generator):
    prompt = PROMPTS[2]  # "Open the file": its greedy answer repeats " file"
    greedy = alone(generator, job(generator, prompt, 8)).text
    assert prompt.endswith("e") and greedy.startswith(" file file")
    stopped = job(generator, prompt, 8, stop=["e f"])  # "...fil|e| f|ile": begins in the prompt, then in the answer
    expected = alone(generator, stopped)
    # HF's stop_strings ended this answer after " file" with no stop string in it; the answer's own match is at " fil"
    assert (expected.text, expected.finish_reason) == (" fil", "stop")
    done = run(RunningBatch(generator), {0: [job(generator, PROMPTS[1], 8), stopped]})
    assert (done[stopped][1].text, done[stopped][1].finish_reason) == (" fil", "stop")


def test_a_request_whose_prefill_fails_fails_alone_and_the_running_rows_go_on(generator):
    """Out of memory on one long prompt's prefill must not take the answers already running with it."""
    from specialize.serve.decode import AdmitFailed

    batch = RunningBatch(generator)
    first = job(generator, PROMPTS[0], 6)
    ended = batch.admit([first])
    real_forward = generator.model.forward

    def failing(*args, **kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:  # a prefill
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    generator.model.forward = failing
    try:
        with pytest.raises(AdmitFailed):
            batch.admit([job(generator, PROMPTS[1], 6)])
        assert [r.job for r in batch.rows] == [first]
        while batch:
            ended += batch.step()
    finally:
        generator.model.forward = real_forward
    [(done, completion)] = ended
    assert done is first and completion.text == alone(generator, first).text
