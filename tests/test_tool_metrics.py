"""The tool_call task: names, arguments, JSON validity and the decision to call, on exact rows."""

from __future__ import annotations

import pytest

from specialize.evaluate.metrics import tool_call_scores
from specialize.evaluate.tasks import detect_task, score
from specialize.tools import render_tool_calls

PARIS = render_tool_calls([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}])
OSLO = render_tool_calls([{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}])
TIME = render_tool_calls([{"name": "get_time", "arguments": {"city": "Paris", "unit": "c"}}])


def test_one_row_scores():
    assert tool_call_scores(PARIS, PARIS) == {"should_call": True, "called": True, "invalid": 0, "field_f1": 1.0,
                                              "tool_name_accuracy": 1.0, "arguments_exact_match": 1.0,
                                              "exact_match": 1.0}
    # same function, one argument of two wrong: pairs (name), city, unit -> 2 of 3 shared
    wrong_city = tool_call_scores(OSLO, PARIS)
    assert wrong_city["field_f1"] == pytest.approx(2 / 3) and wrong_city["tool_name_accuracy"] == 1.0
    assert wrong_city["arguments_exact_match"] == 0.0 and wrong_city["exact_match"] == 0.0
    assert tool_call_scores(TIME, PARIS)["tool_name_accuracy"] == 0.0
    # key order and whitespace do not matter; Llama 3.1's bare JSON is a call
    assert tool_call_scores('{"name": "get_weather", "parameters": {"unit": "c", "city": "Paris"}}',
                            PARIS)["exact_match"] == 1.0
    broken = tool_call_scores('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', PARIS)
    assert broken["called"] and broken["invalid"] == 1 and broken["field_f1"] == 0.0
    direct = tool_call_scores("It is sunny.", "It is sunny!")
    assert direct == {"should_call": False, "called": False, "invalid": 0, "field_f1": 1.0, "exact_match": 1.0,
                      "answer_f1": 1.0}
    assert tool_call_scores(PARIS, "It is sunny.")["field_f1"] == 0.0


def test_score_aggregates_precision_recall_and_validity():
    rows = [{"prediction": PARIS, "reference": PARIS},  # called, right
            {"prediction": OSLO, "reference": PARIS},  # called, wrong argument
            {"prediction": "No idea.", "reference": PARIS},  # should have called
            {"prediction": PARIS, "reference": "Hello there."},  # should have answered
            {"prediction": "Hello there.", "reference": "Hello there."},  # answered directly, right
            {"prediction": "<tool_call>\n{oops", "reference": "Hi."}]  # a malformed attempt
    metrics, per_example = score("tool_call", rows)
    assert metrics["tool_name_accuracy"] == pytest.approx(2 / 3)
    assert metrics["arguments_exact_match"] == pytest.approx(1 / 3)
    assert metrics["call_recall"] == pytest.approx(2 / 3)  # 2 of the 3 rows that should call did
    assert metrics["call_precision"] == pytest.approx(2 / 4)  # 4 rows called (one malformed), 2 should have
    assert metrics["json_valid"] == pytest.approx(3 / 4)
    assert metrics["exact_match"] == pytest.approx(2 / 6)
    assert metrics["field_f1"] == pytest.approx((1 + 2 / 3 + 0 + 0 + 1 + 0) / 6)
    assert metrics["answer_f1"] == pytest.approx(1 / 3)
    assert "hallucination_rate" not in metrics and metrics["n"] == 6
    assert per_example[5]["categories"] == ["wrong", "bad_format"]
    assert per_example[0]["categories"] == ["correct"] and per_example[1]["categories"] == ["partly_right"]


def test_metrics_without_rows_to_average_are_left_out():
    metrics, _ = score("tool_call", [{"prediction": "Hi.", "reference": "Hi."}])
    assert {"tool_name_accuracy", "call_recall", "call_precision", "json_valid"}.isdisjoint(metrics)
    assert metrics["field_f1"] == 1.0 and metrics["answer_f1"] == 1.0


def test_tool_call_task_is_detected_from_references():
    assert detect_task("qa", ["Paris.", PARIS]) == "tool_call"
    assert detect_task("qa", ["Paris."]) == "qa"
    assert detect_task("extract", [PARIS]) == "extract"  # an explicit task is kept


def test_eval_scores_a_predictions_file_as_tool_call(tmp_path, capsys):
    from helpers import write_jsonl

    from specialize.config import EvalConfig
    from specialize.evaluate.run import run_eval

    path = write_jsonl(tmp_path / "preds.jsonl", [{"prediction": PARIS, "reference": PARIS},
                                                  {"prediction": "Hello.", "reference": PARIS}])
    metrics = run_eval(EvalConfig(predictions=str(path), task="tool_call", json_output=True))
    assert metrics["call_recall"] == 0.5 and metrics["tool_name_accuracy"] == 0.5 and metrics["field_f1"] == 0.5
    assert '"call_recall": 0.5' in capsys.readouterr().out


def test_json_references_with_a_name_are_not_tool_calls():
    """Q&A answers that are JSON records with a "name" are not Llama-3.1 bare calls."""
    assert detect_task("qa", ['{"name": "John", "email": "john@example.com"}', '{"name": "Ann", "age": 3}']) == "qa"
    assert detect_task("qa", ['{"name": "get_weather", "parameters": {"city": "Oslo"}}']) == "tool_call"
