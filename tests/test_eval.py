"""`specialize eval`: a run that answers QA8 exactly scores 1.0; predictions files; RAG prompts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specialize.cli import app
from specialize.config import EvalConfig
from specialize.data.formats import load_examples
from specialize.errors import UserError
from specialize.evaluate import load_predictions, score
from specialize.evaluate.compare import with_fewshot
from specialize.evaluate.run import run_eval
from specialize.evaluate.systems import build_conversations, evaluate_system
from specialize.generate import Generator
from specialize.retrieval import Retriever, rag_prompt
from helpers import ASSETS, QA8, write_jsonl

QA = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]
COST_KEYS = ("latency_s_per_example", "prompt_tokens_per_example", "completion_tokens_per_example")
def write_docs(path: Path) -> Path:
    """Passages about the QA8 facts plus distractors, as a JSONL document store."""
    texts = [row["answer"] + " " + row["question"].rstrip("?") + " is a common quiz question." for row in QA]
    texts += ["Refunds are paid back to the original card within five working days.",
              "The support desk is open Monday to Friday, 9:00 to 17:00 CET."]
    return write_jsonl(path, [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)])


@pytest.fixture(scope="module")
def run(qa8_run) -> Path:
    return qa8_run


def test_eval_json_prints_one_object_and_the_run_answers_qa8_exactly(run, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "specialize", "eval", "--model", str(run), "--data", str(QA8),
                           "--max-new-tokens", "40", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # nothing but the JSON object on stdout
    metrics = json.loads(lines[0])
    assert metrics["exact_match"] == 1.0 and metrics["f1"] == 1.0 and metrics["stop_rate"] == 1.0
    assert metrics["n"] == 8 and metrics["hallucination_rate"] == 0.0
    assert metrics["latency_s_per_example"] > 0 and metrics["prompt_tokens_per_example"] > 5
    assert json.loads((out / "metrics.json").read_text()) == metrics

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [q["answer"] for q in QA]
    assert [r["reference"] for r in rows] == [q["answer"] for q in QA]
    assert [r["question"] for r in rows] == [q["question"] for q in QA]
    assert all(r["stopped"] and r["finish_reason"] == "stop" and r["context"] is None for r in rows)
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": q["question"]}] for q in QA]
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in rows)
    # predictions.jsonl is a predictions file: re-scoring it gives the same quality metrics
    rescored, _ = score("qa", load_predictions(out / "predictions.jsonl"))
    assert rescored == {k: v for k, v in metrics.items() if k not in COST_KEYS}


def test_predictions_file_via_cli_equals_score():
    path = ASSETS / "eval" / "predictions.jsonl"
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--task", "qa", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == score("qa", load_predictions(path))[0]


def test_rag_prompt_in_eval_is_rag_prompt_of_the_top_k(run, tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl")
    metrics = run_eval(EvalConfig(model=str(run), data=str(QA8), docs=str(docs), top_k=2, max_new_tokens=8,
                                  out=tmp_path / "eval", json_output=True))
    assert json.loads(capsys.readouterr().out) == metrics
    retriever = Retriever.build(docs)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    for row, qa in zip(rows, QA):
        passages = retriever.search(qa["question"], 2)
        assert passages  # every question shares words with its fact
        assert row["messages"] == [{"role": "user", "content": rag_prompt(qa["question"], passages)}]
        assert row["context"] == "\n\n".join(p.text for p in passages)
    # longer prompts with the retrieved context
    assert metrics["prompt_tokens_per_example"] > 40


def test_fewshot_turns_skip_the_question_and_follow_the_system_prompt():
    examples = load_examples([str(QA8)], system_prompt="Answer briefly.")
    conversations, contexts = build_conversations(with_fewshot(examples[:3], examples[:3], 2))
    assert contexts == [None] * 3
    first = conversations[0]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in first[1:5]] == [QA[1]["question"], QA[1]["answer"],
                                                  QA[2]["question"], QA[2]["answer"]]
    assert first[-1]["content"] == QA[0]["question"]
    assert [m["content"] for m in conversations[2][1:5:2]] == [QA[0]["question"], QA[1]["question"]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "nothing to evaluate"),
    (dict(model="m", data="d.jsonl", predictions="p.jsonl"), "not both"),
    (dict(model="m"), "nothing to evaluate"),
])
def test_eval_needs_a_model_and_data_or_predictions(kwargs, message):
    with pytest.raises(UserError, match=message):
        run_eval(EvalConfig(**kwargs))


def test_eval_refuses_raw_text_as_a_test_set(run, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "just some text"}])
    with pytest.raises(UserError, match="raw text rows cannot be evaluated"):
        run_eval(EvalConfig(model=str(run), data=str(data)))


def test_a_prompt_that_does_not_fit_the_context_is_a_user_error_naming_the_example(run, tmp_path):
    where = re.escape(str(QA8))
    with pytest.raises(UserError, match=rf"{where}:1: eval: the prompt is \d+ tokens, which plus max_new_tokens "
                                        r"\(510\) exceeds the model's context of 512 tokens; lower --max-new-tokens"):
        run_eval(EvalConfig(model=str(run), data=str(QA8), max_new_tokens=510))
    # compare names the system and split; with RAG, the retrieved context is what made it long
    generator = Generator.load(run)
    forwards = []
    generator.model.register_forward_hook(lambda *args: forwards.append(1))
    examples = load_examples([str(QA8)])
    retriever = Retriever.build(write_docs(tmp_path / "docs.jsonl"))
    conversations = build_conversations(examples, retriever, 2)[0]
    lengths = [len(generator.prompt_ids(c)) for c in conversations]
    budget = 512 - max(lengths) + 1  # only the longest prompts overflow: the first of them is named
    line = lengths.index(max(lengths)) + 1
    with pytest.raises(UserError, match=rf"{where}:{line}: finetuned\+rag / qa8: the prompt with its retrieved "
                                        rf"context is {max(lengths)} tokens, which plus max_new_tokens "
                                        rf"\({budget}\) exceeds .* or --top-k"):
        evaluate_system(generator, examples, "qa", retriever, top_k=2, max_new_tokens=budget,
                        description="finetuned+rag / qa8")
    assert forwards == []  # refused before anything was generated


def test_an_out_that_cannot_be_a_folder_fails_before_anything_runs(tmp_path):
    blocker = tmp_path / "bad.jsonl"
    blocker.write_text("{}\n", encoding="utf-8")
    cfg = EvalConfig(predictions=str(tmp_path / "missing.jsonl"), task="qa", out=str(blocker / "e"))
    with pytest.raises(UserError, match=r"bad.jsonl/e: cannot create the output folder"):
        run_eval(cfg)  # the folder is checked before the predictions are even read
