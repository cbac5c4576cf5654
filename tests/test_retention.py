"""Retention (what fine-tuning forgets) and replay (the mitigation): finetune --retention / --replay-data."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest
from helpers import QA8, write_jsonl

from specialize.config import EvalConfig, FinetuneConfig, PretrainConfig
from specialize.errors import UserError

MODULES = ("json", "os", "re", "shutil", "string", "textwrap", "typing", "pathlib", "random", "logging",
           "inspect", "collections")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A micro pretrain run on 12 stdlib modules' docs, 2 of them held out as whole documents."""
    from specialize.pretrain import pretrain

    folder = tmp_path_factory.mktemp("corpus")
    for name in MODULES:
        module = importlib.import_module(name)
        text = "\n\n".join(inspect.getdoc(getattr(module, m)) or "" for m in sorted(vars(module))
                           if not m.startswith("_") and callable(getattr(module, m)))[:4000]
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    run = pretrain(PretrainConfig(data=[str(folder)], out=tmp_path_factory.mktemp("base") / "run", size="micro",
                                  vocab_size=512, max_seq_tokens=32, micro_batch_size=16, max_steps=3,
                                  eval_fraction=0.2, progress=False, seed=0))
    return Path(run)


def _finetune(base: Path, out: Path, **kw):
    from specialize.finetune import finetune

    values = {"base": str(base), "data": [str(QA8)], "out": out, "method": "full", "max_steps": 3,
              "learning_rate": 5e-3, "micro_batch_size": 8, "eval_fraction": 0.0, "progress": False}
    return finetune(FinetuneConfig(**(values | kw)))


def test_default_retention_is_the_bases_held_out_documents(pretrained, tmp_path):
    """Before training, retention perplexity is exactly the base's own held-out perplexity: same
    documents (found again from its sources), same blocks, same loss; training moves it."""
    base_summary = json.loads((pretrained / "train_summary.json").read_text())
    run = _finetune(pretrained, tmp_path / "ft")
    row = run.read_summary()["retention"]["held-out documents"]
    assert row["kind"] == "perplexity"
    assert row["before"] == pytest.approx(base_summary["eval_perplexity"], rel=1e-5)
    assert row["blocks"] == base_summary["eval_blocks"]
    assert row["after"] != pytest.approx(row["before"], rel=1e-4)
    assert row["change"] == pytest.approx(row["after"] - row["before"])
    assert row["relative_change"] == pytest.approx(row["change"] / row["before"])


def test_no_default_when_the_corpus_changed(pretrained, tmp_path):
    """A corpus with another document count is not the one the base held out from: no default set."""
    from specialize.retention import pretrain_split
    from specialize.rundir import RunDir

    assert len(pretrain_split(str(pretrained)).held) == 2
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(pretrained, copy)
    corpus = Path(RunDir(pretrained).read_config()["data"][0])
    extra = tmp_path / "extra"
    shutil.copytree(corpus, extra)
    (extra / "more.txt").write_text("another document", encoding="utf-8")
    config = (copy / "config.yaml").read_text().replace(str(corpus), str(extra))
    (copy / "config.yaml").write_text(config)
    assert pretrain_split(str(copy)) == "its pre-training text changed (13 documents now, 12 when it was trained)"


def test_qa_retention_is_f1_of_the_saved_model(pretrained, tmp_path):
    """F1 retention after training equals `specialize eval` of the saved run on the same file."""
    from specialize.evaluate.run import run_eval

    qa = write_jsonl(tmp_path / "general_qa.jsonl", [json.loads(line) for line in QA8.read_text().splitlines()][:4])
    run = _finetune(pretrained, tmp_path / "ft", retention=[str(qa)], max_new_tokens=8)
    retention = run.read_summary()["retention"]
    assert list(retention) == ["general_qa.jsonl"]  # an explicit set replaces the default
    row = retention["general_qa.jsonl"]
    metrics = run_eval(EvalConfig(model=str(run), data=str(qa), max_new_tokens=8, json_output=True))
    assert row["kind"] == "f1" and row["examples"] == 4
    assert row["after"] == pytest.approx(metrics["f1"])
    assert row["exact_match_after"] == pytest.approx(metrics["exact_match"])


def test_replay_carries_its_share_of_target_tokens_and_skips_retention_documents(pretrained, tmp_path):
    from transformers import AutoTokenizer

    from specialize.data.formats import Example
    from specialize.data.tokenize import Encoded
    from specialize.retention import replay_items

    tokenizer = AutoTokenizer.from_pretrained(pretrained / "model")
    task = [Encoded([1] * 11, [-100] + [5] * 10)] * 8  # 80 target tokens
    docs = [Example(text="held out text " * 20), Example(text="general text number one " * 3),
            Example(text="general text number two " * 3)]
    items, left_out = replay_items(docs, task, 0.2, 0, tokenizer, None, 16, leave_out={docs[0].text})
    tokens = sum(i.target_tokens for i in items)
    assert left_out == 1
    assert 20 <= tokens < 20 + 16  # 0.2 / 0.8 * 80, at most one window over
    held_ids = set(map(tuple, (tokenizer(docs[0].text)["input_ids"][i: i + 16] for i in range(0, 60, 16))))
    assert not any(tuple(i.input_ids) in held_ids for i in items)


def test_replay_leaves_out_the_qa_retention_examples(pretrained, tmp_path):
    """A Q&A file given as both --retention and --replay-data: its F1 would measure memorising."""
    from transformers import AutoTokenizer

    from specialize.data.formats import load_examples
    from specialize.data.templates import resolve_template
    from specialize.data.tokenize import Encoded
    from specialize.retention import load_retention, replay_items

    tokenizer = AutoTokenizer.from_pretrained(pretrained / "model")
    rows = [json.loads(line) for line in QA8.read_text().splitlines()]
    held = write_jsonl(tmp_path / "general_qa.jsonl", rows[:3])
    replay = write_jsonl(tmp_path / "replay.jsonl", [r | {"question": "  " + r["question"]} for r in rows])
    (qa_set,) = load_retention([str(held)], base=str(pretrained), tokenizer=tokenizer, context=None)
    leave_out = {text for s in [qa_set] for text in s.texts}  # as finetune builds it
    task = [Encoded([1] * 11, [-100] + [5] * 10)] * 8
    template = resolve_template("qa", tokenizer)
    items, left_out = replay_items(load_examples([str(replay)]), task, 0.5, 0, tokenizer, template, 512, leave_out)
    assert left_out == 3
    trained = " ".join(tokenizer.decode(i.input_ids) for i in items)
    assert not [r["question"] for r in rows[:3] if r["question"] in trained]
    assert [r["question"] for r in rows[3:] if r["question"] in trained]


def test_replay_in_finetune_summary(pretrained, tmp_path):
    corpus = Path(json.loads((pretrained / "train_summary.json").read_text())["data_dir"]).parent
    from specialize.rundir import RunDir

    sources = RunDir(pretrained).read_config()["data"]
    run = _finetune(pretrained, tmp_path / "ft", replay_data=sources, replay_fraction=0.25)
    replay = run.read_summary()["replay"]
    assert replay["left_out"] == 2  # the two held-out documents are never replayed
    assert 0.25 <= replay["share"] < 0.5
    assert corpus.exists()


def test_mixed_retention_folder_is_one_clear_error(pretrained, tmp_path):
    """A folder of text files and Q&A has no one score: refused, naming it, before any training."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("some general text", encoding="utf-8")
    write_jsonl(mixed / "b.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(UserError) as e:
        _finetune(pretrained, tmp_path / "ft", retention=[str(mixed)])
    assert str(e.value) == f"{mixed}: a retention file holds either text (perplexity) or Q&A (F1), not both"
    assert not (tmp_path / "ft" / "model").exists()


def test_retention_with_another_objective_is_refused_up_front(tmp_path):
    from specialize.finetune import finetune

    with pytest.raises(UserError) as e:
        finetune(FinetuneConfig(base="unused", data=[str(QA8)], out=tmp_path / "ft", objective="dpo",
                                retention=[str(QA8)], progress=False))
    assert str(e.value) == "--retention and --replay-data work with --objective sft only, not dpo"
    assert not (tmp_path / "ft").exists()


def test_lora_starts_from_the_base(pretrained, tmp_path):
    """LoRA's "before" is the base itself (adapters start at zero), so full and LoRA runs share it."""
    base_summary = json.loads((pretrained / "train_summary.json").read_text())
    row = _finetune(pretrained, tmp_path / "lora", method="lora").read_summary()["retention"]["held-out documents"]
    assert row["before"] == pytest.approx(base_summary["eval_perplexity"], rel=1e-5)
    assert row["after"] != pytest.approx(row["before"], rel=1e-6)
