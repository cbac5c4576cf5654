"""`specialize compare`: every system on every split, scorecard.json, predictions, report.html."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from specialize.config import CompareConfig
from specialize.data.templates import CHATML_TEMPLATE, install_template, ours
from specialize.errors import UserError
from specialize.evaluate.compare import (compare, fewshot_pool, find_base, load_base_generator, parse_predictions,
                                         with_fewshot)
from specialize.evaluate.systems import load_test_examples
from specialize.generate import Generator
from specialize.model import load_tokenizer
from helpers import QA8, write_jsonl
from test_eval import QA, write_docs

GENERATED = ["base", "base+fewshot", "base+rag", "finetuned", "finetuned+rag"]
UNSEEN = [{"question": "Which gas do plants take in?", "answer": "Plants take in carbon dioxide."},
          {"question": "What is frozen water called?", "answer": "Frozen water is called ice."}]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_llama, qa8_run):
    run = qa8_run
    tmp = tmp_path_factory.mktemp("compare")
    unseen = write_jsonl(tmp / "unseen.jsonl", UNSEEN)
    # another system's answers to the qa8 split: right on the first half only
    other = write_jsonl(tmp / "other.jsonl", [{"prediction": q["answer"] if i < 4 else "I do not know.",
                                               "reference": q["answer"], "question": q["question"]}
                                              for i, q in enumerate(QA)])
    cfg = CompareConfig(model=str(run), data=[str(QA8), str(unseen)], docs=str(write_docs(tmp / "docs.jsonl")),
                        predictions=[f"other={other}"], fewshot=2, max_new_tokens=40, out=tmp / "out")
    return run, cfg.out, compare(cfg, progress=False)


def test_every_system_has_every_column(compared):
    run, out, scorecard = compared
    systems = {s["name"]: s for s in scorecard["systems"]}
    assert list(systems) == GENERATED + ["other"]
    summary = json.loads((run / "train_summary.json").read_text())
    for name in GENERATED:
        s = systems[name]
        assert s["latency_s_per_example"] > 0 and s["prompt_tokens_per_example"] > 0
        assert s["training"] == ({"seconds": summary["seconds"], "tokens": summary["tokens"]}
                                 if name.startswith("finetuned") else None)
        assert list(s["splits"]) == ["qa8", "unseen"]
        for split, n in (("qa8", 8), ("unseen", 2)):
            m = s["splits"][split]
            assert {"exact_match", "f1", "stop_rate", "hallucination_rate", "rouge_l"} <= set(m)
            assert m["n"] == n
    other = systems["other"]
    assert other["latency_s_per_example"] is None and other["prompt_tokens_per_example"] is None
    assert other["training"] is None and list(other["splits"]) == ["qa8"]
    assert other["splits"]["qa8"]["exact_match"] == 0.5
    assert systems["finetuned"]["splits"]["qa8"]["exact_match"] == 1.0
    # context and solved examples make prompts longer
    assert systems["base+rag"]["prompt_tokens_per_example"] > systems["base"]["prompt_tokens_per_example"]
    assert systems["base+fewshot"]["prompt_tokens_per_example"] > systems["base"]["prompt_tokens_per_example"]
    assert scorecard["base"] == summary["base"]  # found in train_summary.json


def test_recommendation_and_files(compared):
    run, out, scorecard = compared
    rec = scorecard["recommendation"]
    assert rec["system"] in [s["name"] for s in scorecard["systems"]] and rec["reasons"]
    assert json.loads((out / "scorecard.json").read_text()) == json.loads(json.dumps(scorecard))
    for name in GENERATED:
        for split, n in (("qa8", 8), ("unseen", 2)):
            rows = (out / "predictions" / name / f"{split}.jsonl").read_text().splitlines()
            assert len(rows) == n
    assert len((out / "predictions" / "other" / "qa8.jsonl").read_text().splitlines()) == 8
    fewshot = json.loads((out / "predictions" / "base+fewshot" / "qa8.jsonl").read_text().splitlines()[0])
    assert [m["content"] for m in fewshot["messages"]] == [QA[1]["question"], QA[1]["answer"],
                                                           QA[2]["question"], QA[2]["answer"], QA[0]["question"]]
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(|@import""", html, re.I)
    assert all(name in html for name in GENERATED + ["other"])
    assert "Loss curve" in html  # from the run's metrics.jsonl


def test_base_is_prompted_with_the_runs_template(tmp_path, tiny_llama):
    # a run whose template (chatml) differs from the base's default (qa)
    run = tmp_path / "run"
    shutil.copytree(tiny_llama, run / "model")
    tokenizer = load_tokenizer(run / "model")
    install_template(tokenizer, ours("chatml", tokenizer))
    tokenizer.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"base": str(tiny_llama)}))
    assert Generator.load(tiny_llama).template.name == "qa"
    generator = load_base_generator(find_base(str(run)), str(run))
    assert generator.template.name == "chatml" and CHATML_TEMPLATE in generator.template.jinja
    assert generator.prompt_ids([{"role": "user", "content": "Hi"}]) == \
        Generator.load(run).prompt_ids([{"role": "user", "content": "Hi"}])


# Two paraphrases of one fact: the answers differ only in what exact_match normalises away.
PARAPHRASES = [{"question": "What is the capital of France?", "answer": "Paris is the capital of France."},
               {"question": "Which city is the French capital?", "answer": "paris is the capital of France"},
               {"question": "Who wrote Hamlet?", "answer": "William Shakespeare wrote Hamlet."},
               {"question": "How many legs does a spider have?", "answer": "A spider has eight legs."}]


def contents(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages]


def test_fewshot_never_shows_a_paraphrase_of_the_asked_fact(tmp_path):
    examples = load_test_examples(str(write_jsonl(tmp_path / "test.jsonl", PARAPHRASES)))
    asked = with_fewshot(examples, examples, 2)
    shots = [PARAPHRASES[2]["question"], PARAPHRASES[2]["answer"], PARAPHRASES[3]["question"],
             PARAPHRASES[3]["answer"]]
    for i in (0, 1):
        assert contents(asked[i].messages) == shots + [PARAPHRASES[i]["question"], PARAPHRASES[i]["answer"]]
        assert asked[i].reference == PARAPHRASES[i]["answer"]
    assert contents(asked[2].messages)[:2] == [PARAPHRASES[0]["question"], PARAPHRASES[0]["answer"]]
    labels = load_test_examples(str(write_jsonl(tmp_path / "labels.jsonl", [
        {"input": "Refund my order", "output": "billing"}, {"input": "I was charged twice", "output": "Billing"},
        {"input": "The app crashes", "output": "bug"}])))
    # a label is no leak: classify examples may share the asked row's label
    assert contents(with_fewshot(labels, labels, 2, "classify")[0].messages)[:4] == [
        "I was charged twice", "Billing", "The app crashes", "bug"]


def test_compare_fewshot_prompts_hold_no_paraphrase_answer(tmp_path, tiny_llama):
    test = write_jsonl(tmp_path / "test.jsonl", PARAPHRASES)
    compare(CompareConfig(base=str(tiny_llama), data=[str(test)], fewshot=3, max_new_tokens=2, out=tmp_path / "out"),
            progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions" / "base+fewshot" / "test.jsonl")
            .read_text().splitlines()]
    for i in (0, 1):  # only the two other facts fit, so two shots instead of three
        assert contents(rows[i]["messages"]) == [PARAPHRASES[2]["question"], PARAPHRASES[2]["answer"],
                                                 PARAPHRASES[3]["question"], PARAPHRASES[3]["answer"],
                                                 PARAPHRASES[i]["question"]]


def test_fewshot_examples_come_from_the_runs_training_data(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": [str(write_jsonl(tmp_path / "train.jsonl", UNSEEN))]}))
    splits = {"test": load_test_examples(str(QA8))}
    assert [e.reference for e in fewshot_pool(str(run), splits)] == [u["answer"] for u in UNSEEN]
    (run / "config.yaml").write_text(yaml.safe_dump({"data": [str(tmp_path / "moved.jsonl")]}))
    assert fewshot_pool(str(run), splits) is splits["test"]  # its data moved: the first split
    assert fewshot_pool(None, splits) is splits["test"]


def test_predictions_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("x.jsonl", "y.jsonl", "z=1.jsonl"):
        Path(name).write_text("{}\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing.jsonl: field 'predictions': predictions file not found"):
        parse_predictions(["a=missing.jsonl"], ["test"])  # before any model runs
    assert parse_predictions(["a=x.jsonl", "a@unseen=y.jsonl", "b=z=1.jsonl"], ["test", "unseen"]) == \
        {"a": {"test": "x.jsonl", "unseen": "y.jsonl"}, "b": {"test": "z=1.jsonl"}}
    for spec, message in (("x.jsonl", "expected NAME=FILE"), ("base=x.jsonl", "generated system"),
                          ("a@dev=x.jsonl", "no split 'dev'")):
        with pytest.raises(UserError, match=message):
            parse_predictions([spec], ["test", "unseen"])


def test_compare_needs_a_base_it_can_find(tmp_path):
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(UserError, match="give --base"):
        find_base(str(tmp_path))


def test_a_rerun_into_the_same_out_leaves_no_stale_predictions(tmp_path):
    from specialize.evaluate import compare as compare_module
    from specialize.evaluate.systems import SystemResult
    from specialize.evaluate.tasks import score

    rows = [{"prediction": "Paris", "reference": "Paris", "question": "Capital of France?", "stopped": True}]
    metrics, per_example = score("qa", rows)
    result = SystemResult(metrics, per_example, rows, 0.1, 0.1, 10.0, 2.0)
    scorecard = {"task": "qa", "systems": [{"name": "base", "splits": {"test": metrics}}],
                 "recommendation": {"system": "base", "metric": "f1", "reasons": ["only one"]}}
    out = tmp_path / "cmp"
    compare_module._write(out, scorecard, {"base": {"test": result}, "base+fewshot": {"test": result}}, None)
    compare_module._write(out, scorecard, {"base": {"test": result}}, None)  # a re-run without few-shot
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["base"]
    assert sorted(p.name for p in out.iterdir()) == ["predictions", "report.html", "scorecard.json"]  # no temp left
    assert json.loads((out / "scorecard.json").read_text())["systems"][0]["name"] == "base"


def test_scorecard_json_keys_are_the_typed_scorecards_fields(compared):
    from specialize.evaluate.scorecard import Recommendation, Scorecard, SystemScore, Training

    run, out, scorecard = compared
    written = json.loads((out / "scorecard.json").read_text())
    assert list(written) == [f for f in Scorecard.model_fields if f != "demo"]  # demo: `specialize demo` only
    assert all(list(s) == list(SystemScore.model_fields) for s in written["systems"])
    assert all(list(s["training"]) == list(Training.model_fields) for s in written["systems"] if s["training"])
    assert list(written["recommendation"]) == list(Recommendation.model_fields)
    assert Scorecard.model_validate(written).to_json() == written


def test_other_runs_are_systems_with_their_cost_and_retention(tmp_path, qa8_run):
    """--runs NAME=RUN (issue #14: sft vs sft+dpo): its own systems, training cost and retention."""
    dpo = tmp_path / "dpo"
    shutil.copytree(qa8_run, dpo)
    summary = json.loads((dpo / "train_summary.json").read_text())
    retention = {"before": {"perplexity": 9.1}, "after": {"perplexity": 9.8}}
    (dpo / "train_summary.json").write_text(json.dumps(summary | {"seconds": 7.0, "retention": retention}))
    unseen = write_jsonl(tmp_path / "unseen.jsonl", UNSEEN)
    cfg = CompareConfig(model=str(qa8_run), runs=[f"sft+dpo={dpo}"], data=[str(unseen)],
                        docs=str(write_docs(tmp_path / "docs.jsonl")), max_new_tokens=8, out=tmp_path / "out")
    scorecard = compare(cfg, progress=False)
    systems = {s["name"]: s for s in scorecard["systems"]}
    assert list(systems) == ["base", "base+rag", "finetuned", "finetuned+rag", "sft+dpo", "sft+dpo+rag"]
    assert systems["sft+dpo"]["training"]["seconds"] == 7.0 == systems["sft+dpo+rag"]["training"]["seconds"]
    assert systems["sft+dpo"]["retention"] == retention and systems["finetuned"]["retention"] is None
    assert systems["base"]["retention"] is None and systems["sft+dpo"]["tool_calls_per_example"] is None
    # the same weights answer the same: the copy is scored as itself, not as --model
    assert systems["sft+dpo"]["splits"] == systems["finetuned"]["splits"]
    assert systems["sft+dpo"]["splits"]["unseen"]["prompt_tokens_per_example"] == \
        systems["sft+dpo"]["prompt_tokens_per_example"]
    html = (cfg.out / "report.html").read_text()
    assert "sft+dpo+rag" in html and "perplexity 9.100 -&gt; 9.800" in html
    assert sorted(p.name for p in (cfg.out / "predictions").iterdir()) == sorted(systems)


def test_runs_specs(tmp_path):
    from specialize.evaluate.compare import parse_runs

    (tmp_path / "r").mkdir()
    assert parse_runs([f"dpo={tmp_path / 'r'}", f"grpo={tmp_path / 'r'}"], set()) == \
        {"dpo": str(tmp_path / "r"), "grpo": str(tmp_path / "r")}
    for spec, taken, message in (("dpo", set(), "expected NAME=RUN"), (f"base={tmp_path / 'r'}", set(), "'base' is"),
                                 (f"finetuned={tmp_path / 'r'}", set(), "'finetuned' is already"),
                                 (f"gpt4o={tmp_path / 'r'}", {"gpt4o"}, "'gpt4o' is already"),
                                 (f"x={tmp_path / 'nope'}", set(), "run folder not found")):
        with pytest.raises(UserError, match=message):
            parse_runs([spec], taken)
    with pytest.raises(UserError, match="'a\\+rag' is already the name of a system"):
        parse_runs([f"a+rag={tmp_path / 'r'}", f"a={tmp_path / 'r'}"], set())


def test_agent_is_on_for_runs_trained_with_search_and_needs_docs(tmp_path, qa8_run):
    from specialize.evaluate.compare import agent_wanted

    docs = str(write_docs(tmp_path / "docs.jsonl"))
    assert not agent_wanted(CompareConfig(model=str(qa8_run), docs=docs), str(qa8_run))  # plain Q&A run
    assert agent_wanted(CompareConfig(model=str(qa8_run), docs=docs, agent=True), str(qa8_run))
    with pytest.raises(UserError, match="--agent needs --docs"):
        agent_wanted(CompareConfig(model=str(qa8_run), agent=True), str(qa8_run))
    searched = tmp_path / "searched"
    shutil.copytree(qa8_run, searched)
    rows = [{"tools": [{"type": "function", "function": {"name": "search_docs", "parameters": {"type": "object"}}}],
             "messages": [{"role": "user", "content": "Q?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"id": "c1", "type": "function",
                               "function": {"name": "search_docs", "arguments": "{\"query\": \"Q\"}"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "[1] A."},
                          {"role": "assistant", "content": "A."}]}]
    config = yaml.safe_load((searched / "config.yaml").read_text())
    config["data"] = [str(write_jsonl(tmp_path / "agent.jsonl", rows))]
    (searched / "config.yaml").write_text(yaml.safe_dump(config))
    assert agent_wanted(CompareConfig(model=str(searched), docs=docs), str(searched))
    assert not agent_wanted(CompareConfig(model=str(searched), docs=docs, agent=False), str(searched))
    assert not agent_wanted(CompareConfig(model=str(searched)), str(searched))  # nothing to search
