"""The family matrix: lint, finetune (full and LoRA, with --system-prompt), generate, eval, serve and
export on tiny random-weight models of real families (tests/families.py), each with its real chat
template, special tokens and end-of-turn tokens.

For every family the prompt specialize renders is exactly what plain transformers'
`apply_chat_template` renders from the saved run's tokenizer, only the assistant's answer and its
end of turn are trained, and a run that memorised its answer stops at the end-of-turn token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import BY_NAME, FAMILIES, save_family
from fastapi.testclient import TestClient
from helpers import write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from specialize.config import EvalConfig, ExportConfig, FinetuneConfig, LintConfig, ServeConfig
from specialize.data.formats import load_examples
from specialize.data.lint import lint
from specialize.data.templates import resolve_template
from specialize.data.tokenize import IGNORE, encode_examples
from specialize.errors import UserError
from specialize.evaluate.run import run_eval
from specialize.export import export
from specialize.finetune import finetune
from specialize.generate import Generator
from specialize.model import load_tokenizer
from specialize.serve import create_app

SYSTEM = "Answer in one short sentence."
ROWS = [{"question": "What is the capital of France?", "answer": "Paris is the capital."},
        {"question": "Which colour is the sky?", "answer": "The sky is blue."}]
NAMES = [family.name for family in FAMILIES]
SYSTEM_OK = [family.name for family in FAMILIES if family.system]
# What each family trains after the answer text: its end of turn as the real template renders it.
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "smollm2": "<|im_end|>\n",
               "gemma2": "<end_of_turn>\n", "gemma3": "<end_of_turn>\n", "mistral": "</s>",
               "phi3": "<|end|>\n<|endoftext|>", "olmo2": "<|endoftext|>", "pythia": "<|endoftext|>",
               "gpt2": "<|endoftext|>"}
THINK = "<think>\n\n</think>\n\n"  # Qwen3's template puts an empty reasoning block before a final answer


def system_for(name: str) -> str | None:
    return SYSTEM if BY_NAME[name].system else None  # Gemma 2 raises on a system message: trained without one


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def answer_text(name: str, answer: str) -> str:
    """What the model is trained to say before its end of turn (and what generate returns)."""
    return THINK + answer if name == "qwen3" else answer


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("family-data") / "qa.jsonl", ROWS)


@pytest.fixture(scope="session")
def bases(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("family-bases")
    return lambda name: save_family(BY_NAME[name], tokenizer_dir, root / name) \
        if not (root / name).exists() else root / name


@pytest.fixture(scope="session")
def runs(tmp_path_factory, bases, data):
    """Per family: a full run trained until it answers both rows exactly, and a LoRA run on top of it.

    The LoRA run starts from the full run (a run is a valid --base) and trains briefly at a low
    learning rate, so it still answers exactly: what is checked is the family's LoRA path (adapter
    over the architecture, template, stop tokens, merge on export), at a fraction of the time that
    memorising from random weights through rank-8 adapters takes.
    """
    root = tmp_path_factory.mktemp("family-runs")
    done: dict[tuple[str, str], Path] = {}

    def run(name: str, method: str) -> Path:
        if (name, method) not in done:
            full = method == "full"
            base = bases(name) if full else run(name, "full")
            done[name, method] = finetune(FinetuneConfig(
                base=str(base), data=[str(data)], out=root / f"{name}-{method}", method=method,
                system_prompt=system_for(name), epochs=60 if full else 4, learning_rate=1e-2 if full else 1e-3,
                lr_schedule="constant", micro_batch_size=2, warmup_steps=0, lora_rank=8, lora_alpha=16,
                lora_dropout=0.0, progress=False))
        return done[name, method]

    return run


def plain(folder: Path):
    """The run's tokenizer as plain transformers loads it, without specialize."""
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", NAMES)
def test_training_sequence_is_the_plain_rendering_and_trains_only_the_answer(name, runs, bases, data):
    run = runs(name, "full")
    tokenizer = plain(run / "model")
    for row in ROWS:
        conversation = ask(row["question"]) + [{"role": "assistant", "content": row["answer"]}]
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        prompt = tokenizer.apply_chat_template(ask(row["question"]), tokenize=False, add_generation_prompt=True)
        if name != "mistral":
            assert full[len(prompt):] == answer_text(name, row["answer"]) + END_OF_TURN[name]
        if system_for(name):
            assert SYSTEM in prompt  # the run's template carries the system prompt it was trained with
    # What finetune trains, from the base and the data as finetune reads them.
    tokenizer_base = load_tokenizer(bases(name))
    examples = load_examples([str(data)], system_for(name))
    template = resolve_template("auto", tokenizer_base, {"qa"})
    items, _ = encode_examples(examples, tokenizer_base, template, 512)
    for item, row in zip(items, ROWS):
        conversation = ask(row["question"]) + [{"role": "assistant", "content": row["answer"]}]
        prompt = tokenizer.apply_chat_template(ask(row["question"]), tokenize=False, add_generation_prompt=True)
        answer = answer_text(name, row["answer"]) + END_OF_TURN[name]
        assert item.input_ids == tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        trained = [token for token, label in zip(item.input_ids, item.labels) if label != IGNORE]
        assert tokenizer.decode(trained) == answer
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        # Mistral's template drops the system text from a conversation that ends in an answer (it goes
        # into the last user turn only): training then takes the inference prompt, not that rendering.
        assert (full == prompt + answer) == (name != "mistral")


@pytest.mark.parametrize("name", NAMES)
def test_lint_marks_exactly_the_answer_and_its_end_of_turn(name, bases, data, capsys):
    code = lint(LintConfig(data=[str(data)], base=str(bases(name)), system_prompt=system_for(name), show=1))
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"⟦{answer_text(name, ROWS[0]['answer'])}{END_OF_TURN[name]}⟧" in out
    assert out.count("⟦") == 2  # the header says "trained tokens in ⟦ ⟧"; nothing else of the example is trained


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", NAMES)
def test_generate_renders_as_transformers_and_stops_at_the_end_of_turn(name, method, runs):
    run = runs(name, method)
    generator = Generator.load(run)
    tokenizer = plain(run / "model")
    for row in ROWS:
        prompt = tokenizer.apply_chat_template(ask(row["question"]), tokenize=False, add_generation_prompt=True)
        assert generator.template.render(generator.tokenizer, ask(row["question"]), True) == prompt
        assert generator.prompt_ids(ask(row["question"])) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completions = generator.generate([ask(row["question"]) for row in ROWS], max_new_tokens=40)
    assert [(c.text, c.finish_reason) for c in completions] == [
        (answer_text(name, row["answer"]), "stop") for row in ROWS]
    # The answer's tokens plus one stop token: the end-of-turn token ended it, not a length limit.
    answer_ids = tokenizer(answer_text(name, ROWS[0]["answer"]), add_special_tokens=False)["input_ids"]
    assert completions[0].completion_tokens == len(answer_ids)


@pytest.mark.parametrize("name", NAMES)
def test_eval_scores_the_trained_answers(name, runs, data):
    metrics = run_eval(EvalConfig(model=str(runs(name, "full")), data=str(data), task="qa", json_output=True))
    assert (metrics["exact_match"], metrics["stop_rate"]) == (1.0, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_serve_answers_as_generate(name, runs):
    run = runs(name, "full")
    generator = Generator.load(run)
    with TestClient(create_app(generator, ServeConfig(model=str(run)))) as client:
        response = client.post("/v1/chat/completions", json={"messages": ask(ROWS[1]["question"])}).json()
    choice = response["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (answer_text(name, ROWS[1]["answer"]), "stop")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", NAMES)
def test_export_answers_in_plain_transformers(name, method, runs, tmp_path):
    out = export(ExportConfig(model=str(runs(name, method)), out=tmp_path / "export", parity_prompts=2))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    stops = [tokenizer.convert_tokens_to_ids(s) for s in BY_NAME[name].stops]
    eos = model.generation_config.eos_token_id
    assert set(stops) <= set([eos] if isinstance(eos, int) else eos)
    for row in ROWS:
        text = tokenizer.apply_chat_template(ask(row["question"]), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**ids, max_new_tokens=40, do_sample=False)
        new = output[0, ids["input_ids"].shape[1]:].tolist()
        assert new[-1] in stops  # stopped by the end-of-turn token
        assert tokenizer.decode(new, skip_special_tokens=True) == answer_text(name, row["answer"])


def test_a_template_that_refuses_a_system_prompt_names_the_row_and_the_template(bases, data, tmp_path):
    base = bases("gemma2")
    with pytest.raises(UserError) as caught:
        finetune(FinetuneConfig(base=str(base), data=[str(data)], out=tmp_path / "run", system_prompt=SYSTEM,
                                epochs=1, progress=False))
    assert (f"2 examples that the template cannot render: {data}:1: template 'tokenizer' (the chat template of "
            f"{base}) cannot render this conversation: System role not supported") in str(caught.value)
    assert not (tmp_path / "run" / "model").exists()
