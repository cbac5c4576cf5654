"""generate: `Generator.generate`, `generate_ids` and `stream_ids` give the same answers.

The session's QA8 run answers every QA8 question exactly, so batching, budgets, stop strings,
streaming and cancellation can all be checked against the trained answers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import QA8, short_context_gpt2
from transformers import AutoModelForCausalLM

from specialize.generate import Completion, ContextOverflow, Generator
from specialize.model import load_tokenizer, set_generation_ids, stop_token_ids

ROWS = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]
QUESTIONS = [r["question"] for r in ROWS]
ANSWERS = [r["answer"] for r in ROWS]
BEES = QUESTIONS.index("What do bees make?")  # "Bees make honey."
TOKENS = 40  # enough for every trained answer


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def generator(qa8_run) -> Generator:
    return Generator.load(qa8_run)


@pytest.fixture(scope="module")
def prompts(generator) -> list[list[int]]:
    return [generator.prompt_ids(ask(q)) for q in QUESTIONS]


def test_batched_greedy_equals_one_at_a_time(generator, prompts):
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths: left padding is exercised
    progress = []
    batched = generator.generate([ask(q) for q in QUESTIONS], max_new_tokens=TOKENS, batch_size=3,
                                 on_batch=lambda done, total: progress.append((done, total)))
    alone = [generator.generate([ask(q)], max_new_tokens=TOKENS, batch_size=1)[0] for q in QUESTIONS]
    assert [c.text for c in batched] == ANSWERS
    assert batched == alone  # text, finish reason and token counts
    assert all(c.finish_reason == "stop" and c.prompt_tokens == len(p) for c, p in zip(batched, prompts))
    assert progress == [(3, 8), (6, 8), (8, 8)]
    assert generator.generate_ids(prompts, max_new_tokens=TOKENS) == alone  # all 8 in one batch


def test_each_prompt_is_cut_to_its_own_max_new_tokens(generator, prompts):
    full = generator.generate_ids(prompts[:3], max_new_tokens=TOKENS)
    cut = generator.generate_ids(prompts[:3], max_new_tokens=[2, 5, TOKENS])
    assert [c.completion_tokens for c in cut] == [2, 5, full[2].completion_tokens]
    assert [c.finish_reason for c in cut] == ["length", "length", "stop"]
    assert cut[2] == full[2]  # a small neighbour budget changes nothing for the others
    assert all(c.text and answer.startswith(c.text) for c, answer in zip(cut[:2], ANSWERS))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate_ids(prompts[:3], max_new_tokens=[2, 5])


def test_finish_reason_is_length_when_max_new_tokens_is_hit(generator, prompts):
    batched = generator.generate([ask(QUESTIONS[0])], max_new_tokens=3)[0]
    assert batched.finish_reason == "length" and not batched.stopped and batched.completion_tokens == 3
    assert ANSWERS[0].startswith(batched.text)
    assert generator.stream_ids(prompts[0], max_new_tokens=3) == batched


def test_stop_strings_cut_the_text_and_set_finish_reason_stop(generator):
    done = generator.generate([ask(QUESTIONS[BEES]), ask(QUESTIONS[0]), ask(QUESTIONS[1])], max_new_tokens=TOKENS,
                              stop=["honey", "xyz"])
    assert done[0].text == "Bees make " and done[0].finish_reason == "stop"
    assert [c.text for c in done[1:]] == ANSWERS[:2]  # the stop string ended only the answer that had it
    never = generator.generate([ask(QUESTIONS[BEES])], max_new_tokens=TOKENS, stop=["honeycomb", ""])[0]
    assert never.text == ANSWERS[BEES] and never.finish_reason == "stop"


@pytest.mark.parametrize("question, stop, expected", [
    (QUESTIONS[4], None, ANSWERS[4]),
    (QUESTIONS[BEES], ["ho", "xyz"], "Bees make "),
    (QUESTIONS[BEES], ["honey"], "Bees make "),
    (QUESTIONS[BEES], ["honeycomb"], ANSWERS[BEES]),  # "honey" is held back until "." rules the stop out
])
def test_stream_pieces_join_to_the_generate_text_and_never_show_part_of_a_stop_string(generator, question,
                                                                                        stop, expected):
    ids = generator.prompt_ids(ask(question))
    pieces: list[str] = []
    streamed = generator.stream_ids(ids, max_new_tokens=TOKENS, stop=stop, on_text=pieces.append)
    # Pieces are only ever appended, so joining to the final text means nothing was shown that a
    # stop string later took back.
    assert "".join(pieces) == streamed.text == expected
    assert all(pieces) and len(pieces) > 1  # really streamed, piece by piece
    assert streamed == generator.generate([ask(question)], max_new_tokens=TOKENS, stop=stop)[0]


def test_seeded_sampling_streamed_equals_not_streamed(generator, prompts):
    settings = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    sampled = generator.generate_ids(prompts[:1], **settings)[0]
    assert generator.generate_ids(prompts[:1], **settings)[0] == sampled
    assert generator.stream_ids(prompts[0], **settings) == sampled


def test_cancel_stops_generation_early(generator, prompts):
    longest = max(range(len(ANSWERS)), key=lambda i: len(ANSWERS[i]))
    pieces: list[str] = []
    cancelled = generator.stream_ids(prompts[longest], max_new_tokens=TOKENS, on_text=pieces.append,
                                     cancelled=lambda: bool(pieces))  # the client leaves after one piece
    full = generator.generate_ids([prompts[longest]], max_new_tokens=TOKENS)[0]
    assert cancelled.finish_reason == "cancelled" and not cancelled.stopped
    assert cancelled.completion_tokens < full.completion_tokens - 2
    assert "".join(pieces) == cancelled.text and full.text.startswith(cancelled.text)


def test_an_end_of_turn_token_in_generation_config_stops_the_answer(generator, qa8_run, tmp_path):
    # Instruct bases end a turn with a token other than the tokenizer's EOS and list it in
    # generation_config.json (Gemma <end_of_turn>, Phi-3 <|end|>, Llama 3 <|eot_id|>).
    eos = generator.tokenizer.eos_token_id
    prompt = generator.prompt_ids(ask(QUESTIONS[BEES]))
    ids = torch.tensor([prompt])  # (1, T)
    trained = generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                                       do_sample=False, eos_token_id=eos)[0, len(prompt):].tolist()
    # Play the end-of-turn token with one the run really generates inside "Bees make honey.".
    k = next(i for i in range(2, len(trained)) if trained[i] not in trained[:i] + [eos])
    run = tmp_path / "instruct-run"
    shutil.copytree(qa8_run, run)
    settings = json.loads((run / "model" / "generation_config.json").read_text())
    (run / "model" / "generation_config.json").write_text(json.dumps(settings | {"eos_token_id": [eos, trained[k]]}))

    instruct = Generator.load(run)
    assert instruct.stop_ids == [eos, trained[k]]
    forwards = []
    hook = instruct.model.register_forward_hook(lambda *args: forwards.append(1))
    answer = instruct.generate_ids([prompt], max_new_tokens=TOKENS)[0]
    hook.remove()
    expected = Completion(instruct.tokenizer.decode(trained[:k], skip_special_tokens=True), "stop", len(prompt), k)
    assert answer == expected and answer.stopped  # `stopped` is what stop_rate counts
    assert answer.ids == trained[: k + 1]  # the ids as generated, through the stop token that ended it
    assert ANSWERS[BEES].startswith(answer.text) and answer.text != ANSWERS[BEES]
    assert len(forwards) == k + 1  # generation itself ended at the token: it was not only cut afterwards
    assert instruct.stream_ids(prompt, max_new_tokens=TOKENS) == expected
    longer = instruct.prompt_ids(ask(QUESTIONS[4]))
    assert instruct.generate_ids([prompt, longer], max_new_tokens=TOKENS)[0] == expected  # left-padded batch


def test_saved_generation_config_keeps_every_stop_token(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    eos = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.generation_config.eos_token_id = [7, eos, 7, 9]
    assert stop_token_ids(model, tokenizer) == [eos, 7, 9]  # tokenizer EOS first, no duplicates
    set_generation_ids(model, tokenizer)
    assert model.generation_config.eos_token_id == [eos, 7, 9]
    model.generation_config.eos_token_id = eos
    set_generation_ids(model, tokenizer)
    assert model.generation_config.eos_token_id == eos  # a single stop token stays a plain id


def test_a_batch_must_fit_the_context_even_when_each_prompt_does(tokenizer_dir):
    generator = short_context_gpt2(tokenizer_dir)
    word = generator.tokenizer("the", add_special_tokens=False)["input_ids"][0]
    a, b = [word] * 28, [word] * 2  # 28 + 4 and 2 + 30 fit a context of 32; the batch is 28 wide and runs 30
    alone = [generator.generate_ids([a], max_new_tokens=4)[0], generator.generate_ids([b], max_new_tokens=30)[0]]
    with pytest.raises(ContextOverflow, match=r"prompt \(28 tokens\) plus max_new_tokens \(30\) exceeds the "
                                              r"model's context of 32 tokens"):
        generator.generate_ids([a, b], max_new_tokens=[4, 30])  # was an IndexError deep inside GPT-2
    assert isinstance(ContextOverflow(1, 1, 1), ValueError)
    assert generator.generate_ids([b, b], max_new_tokens=[4, 30]) == [
        generator.generate_ids([b], max_new_tokens=4)[0], alone[1]]
    with pytest.raises(ContextOverflow, match="context of 32"):
        generator.stream_ids(a, max_new_tokens=5)
    forwards = []
    hook = generator.model.register_forward_hook(lambda *args: forwards.append(1))
    long = " ".join(["the"] * 40)
    with pytest.raises(ContextOverflow) as raised:  # checked for every prompt before any is answered
        generator.generate([ask("hi"), ask(long), ask("hi")], max_new_tokens=4, batch_size=1)
    hook.remove()
    assert raised.value.index == 1 and raised.value.context == 32 and forwards == []


def test_a_cancelled_row_stops_while_its_neighbours_go_on(generator, prompts):
    alone = generator.generate_ids(prompts[1:3], max_new_tokens=TOKENS)
    done = generator.generate_ids(prompts[:3], max_new_tokens=TOKENS,
                                  cancelled=[lambda: True, lambda: False, lambda: False])
    assert done[0].finish_reason == "cancelled" and done[0].completion_tokens == 1  # checked after each token
    assert done[1:] == alone
    with pytest.raises(ValueError, match="cancel flags"):
        generator.generate_ids(prompts[:3], max_new_tokens=TOKENS, cancelled=[lambda: True])


def test_sampling_follows_temperature_top_p_and_seed(tiny_llama):
    """An untrained model spreads its probability: sampling that ignored its settings could not pass."""
    generator = Generator(AutoModelForCausalLM.from_pretrained(tiny_llama), load_tokenizer(tiny_llama))
    prompt = [generator.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]]

    def ids(**settings) -> tuple[str, int]:
        done = generator.generate_ids(prompt, max_new_tokens=12, **settings)[0]
        return done.text, done.completion_tokens

    greedy = ids()
    samples = [ids(temperature=1.0, seed=seed) for seed in range(4)]
    assert ids(temperature=1.0, seed=0) == samples[0]  # a seed reproduces its sample
    assert len(set(samples)) == 4  # different seeds, different samples
    assert greedy not in samples and ids(seed=3) == greedy  # greedy ignores the seed
    assert ids(temperature=1.0, top_p=1e-6, seed=1) == greedy  # top_p keeps only the likeliest token
    assert ids(temperature=1e-4, seed=2) == greedy  # near-zero temperature is as good as greedy
    # the generate() and stream_ids paths take the same settings
    streamed = generator.stream_ids(prompt[0], max_new_tokens=12, temperature=1.0, seed=0)
    assert (streamed.text, streamed.completion_tokens) == samples[0]


def test_a_leading_reasoning_block_is_split_off_the_answer():
    from specialize.generate import split_reasoning

    assert split_reasoning("<think>\n\n</think>\n\nParis.") == ("", "Paris.")
    assert split_reasoning("<think>France's capital.</think>Paris.") == ("France's capital.", "Paris.")
    assert split_reasoning("Paris. <think>late</think>") == (None, "Paris. <think>late</think>")
    assert split_reasoning("Paris.") == (None, "Paris.")
