"""`specialize pairs`: sampled answers graded against references → pairs that `--objective dpo` reads."""

from __future__ import annotations

import json

import pytest
from helpers import QA8, write_jsonl
from typer.testing import CliRunner

from specialize.config import FinetuneConfig, PairsConfig
from specialize.data.preference import check_preferences, load_preferences
from specialize.errors import UserError
from specialize.generate import Completion
from specialize.pairs import make_pairs, pick_pair


def _c(text: str, finish: str = "stop") -> Completion:
    return Completion(text, finish, 5, 3)


def test_pick_pair_best_and_worst_with_ties_toward_stopping():
    answers = [_c("a", "length"), _c("b"), _c("c"), _c("d", "length"), _c("e")]
    # best 0.9 twice: the one that stopped (1) over the cut one (0); worst 0.1 twice: the cut one (3)
    assert pick_pair([0.9, 0.9, 0.5, 0.1, 0.1], answers, 0.1) == (1, 3)
    assert pick_pair([0.5, 0.55, 0.5, 0.5, 0.5], answers, 0.1) is None  # margin 0.05 < 0.1
    assert pick_pair([0.5] * 5, answers, 0.0) is None  # no margin at all, even with --min-margin 0
    assert pick_pair([1.0, 0.0], [_c("same"), _c(" same ")], 0.1) is None  # the same answer twice
    # an empty answer is never paired (check_preferences refuses an empty side): the next worst is rejected
    assert pick_pair([1.0, 0.0, 0.5], [_c("good"), _c(" "), _c("meh")], 0.1) == (0, 2)
    assert pick_pair([1.0, 0.0], [_c("good"), _c("")], 0.1) is None
    # a fixed chosen side (--chosen reference, the last one) against the worst of the others
    assert pick_pair([0.2, 0.9, 0.2, 1.0], [_c("a"), _c("b"), _c("c", "length"), _c("ref")], 0.1, chosen=3) == (3, 2)
    assert pick_pair([0.2, 0.95, 1.0], [_c("a"), _c("b"), _c("ref")], 0.1, chosen=1) == (1, 0)
    assert pick_pair([0.95, 1.0], [_c("a"), _c("ref")], 0.1, chosen=1) is None  # margin 0.05


def test_pairs_with_the_reference_as_chosen(qa8_run, tmp_path):
    """--chosen reference: every pair prefers the question's reference over the run's worst sample."""
    questions = {json.loads(x)["question"]: json.loads(x)["answer"] for x in QA8.read_text().splitlines()}
    common = dict(model=str(qa8_run), data=[str(QA8)], samples=3, temperature=2.0, max_new_tokens=12, progress=False)
    best = make_pairs(PairsConfig(**common, out=tmp_path / "best.jsonl"))
    summary = make_pairs(PairsConfig(**common, chosen="reference", out=tmp_path / "ref.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    assert summary.pairs == len(rows) >= best.pairs and rows
    for row in rows:
        assert row["chosen"] == questions[row["prompt"]] and row["grade_chosen"] == 1.0
        assert row["grade_rejected"] <= 0.9 and row["rejected"] != row["chosen"]
    # the same samples (same seed): each rejected answer is the worst of that question's samples in --chosen best
    by_prompt = {json.loads(x)["prompt"]: json.loads(x) for x in (tmp_path / "best.jsonl").read_text().splitlines()}
    for row in rows:
        if row["prompt"] in by_prompt:
            assert row["grade_rejected"] == by_prompt[row["prompt"]]["grade_rejected"]


def test_pairs_from_a_run_train_dpo(qa8_run, tmp_path):
    from specialize.cli import app

    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(app, ["pairs", "--model", str(qa8_run), "--data", str(QA8), "--samples", "4",
                                      "--temperature", "2.0", "--max-new-tokens", "12", "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    line = next(x for x in result.output.splitlines() if "pairs written" in x)
    assert line == (f"8 questions, {len(rows)} pairs written to {out}, {8 - len(rows)} skipped (grades less than "
                    "--min-margin 0.1 apart; empty answers are never paired)")
    assert rows, "temperature 2 should make some answers differ"
    questions = {json.loads(x)["question"]: json.loads(x)["answer"] for x in QA8.read_text().splitlines()}
    from specialize.evaluate.metrics import token_f1

    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "grade_chosen", "grade_rejected"}
        assert row["grade_chosen"] == pytest.approx(token_f1(row["chosen"], [questions[row["prompt"]]]), abs=1e-6)
        assert row["grade_rejected"] == pytest.approx(token_f1(row["rejected"], [questions[row["prompt"]]]), abs=1e-6)
        assert row["grade_chosen"] - row["grade_rejected"] >= 0.1
    prefs = load_preferences([str(out)])
    assert len(prefs) == len(rows) and not check_preferences(prefs)
    # the same seed samples the same answers
    again = make_pairs(PairsConfig(model=str(qa8_run), data=[str(QA8)], samples=4, temperature=2.0,
                                   max_new_tokens=12, out=tmp_path / "again.jsonl", progress=False))
    assert (tmp_path / "again.jsonl").read_text() == out.read_text() and again.pairs == len(rows)

    from specialize.finetune import finetune

    run = finetune(FinetuneConfig(base=str(qa8_run), data=[str(out)], out=tmp_path / "dpo", objective="dpo",
                                  max_steps=2, micro_batch_size=4, progress=False))
    assert run.read_summary()["pairs"] == len(rows)


def test_pairs_refuses_raw_text_and_a_missing_model(tmp_path, qa8_run):
    text = write_jsonl(tmp_path / "notes.jsonl", [{"text": "just text"}])
    with pytest.raises(UserError, match="needs questions with reference answers"):
        make_pairs(PairsConfig(model=str(qa8_run), data=[str(text)], out=tmp_path / "p.jsonl", progress=False))
    with pytest.raises(UserError, match="no model given"):
        make_pairs(PairsConfig(data=[str(QA8)], out=tmp_path / "p.jsonl", progress=False))
    with pytest.raises(UserError, match="--grade 'bleu': expected one of"):
        make_pairs(PairsConfig(model=str(qa8_run), data=[str(QA8)], grade="bleu", out=tmp_path / "p.jsonl",
                               progress=False))
