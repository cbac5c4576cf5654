"""pydocs, the embedded default: deterministic, disjoint splits, answers findable, cached."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import specialize
from specialize.cache import default_cache_dir
from specialize.errors import UserError
from specialize.examples import pydocs, stdlib_docs
from specialize.examples.pydocs import PydocsPaths, build_pydocs, load_or_build

SMALL = ["json", "math", "os", "os.path", "shutil", "string", "textwrap"]  # a quick, real subset


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def normalised(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> PydocsPaths:
    return build_pydocs(tmp_path_factory.mktemp("pydocs") / "full", progress=False)


@pytest.fixture(scope="module")
def manifest(built) -> dict:
    return json.loads(built.manifest.read_text())


def test_rebuild_in_a_fresh_process_is_byte_identical(built, tmp_path):
    # Another process with another hash seed: catches ordering by set/dict hash and object addresses.
    src = Path(specialize.__file__).parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(src)}
    again = tmp_path / "again"
    code = "import sys; from specialize.examples.pydocs import build_pydocs as b; b(sys.argv[1], progress=False)"
    subprocess.run([sys.executable, "-c", code, str(again)], check=True, env=env)
    files = sorted(p.relative_to(built.root) for p in built.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (built.root / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_default_build_has_the_promised_sizes(built, manifest):
    counts = manifest["counts"]
    assert counts["train_facts"] == 600 and counts["facts"] >= 1000
    assert counts["train"] == 600 * len(pydocs.TRAIN_TEMPLATES) == len(read_jsonl(built.train))
    assert counts["seen"] == counts["unseen"] == counts["keywords_test"] == 200
    assert counts["practice"] == 600 * len(pydocs.PRACTICE_TEMPLATES) == len(read_jsonl(built.practice))
    assert 0 < counts["routing_test"] <= 200 and counts["routing_train"] > counts["routing_test"]
    assert 300_000 < counts["corpus_chars"] < 5_000_000  # a few MB at most: minutes of CPU pre-training
    assert len(list(built.corpus_dir.glob("*.txt"))) == counts["modules"] == len(manifest["modules"]) > 100
    assert {"builtins", "json", "os.path", "collections.abc"} <= set(manifest["modules"])
    assert not {"antigravity", "this", "tkinter", "idlelib"} & set(manifest["modules"])
    assert manifest["python"].startswith(sys.implementation.name)


def test_splits_are_disjoint(built):
    train, seen, unseen = read_jsonl(built.train), read_jsonl(built.seen), read_jsonl(built.unseen)
    practice = read_jsonl(built.practice)
    train_ids = {r["id"] for r in train}
    assert not train_ids & {r["id"] for r in unseen}  # whole facts held out
    assert {r["id"] for r in seen} <= train_ids  # seen asks about trained facts ...
    train_questions = {r["question"] for r in train}
    assert not train_questions & {r["question"] for r in seen}  # ... in phrasings never trained on
    # practice asks every trained fact in phrasings neither trained on nor tested
    assert {r["id"] for r in practice} == train_ids
    assert not {r["question"] for r in practice} & (train_questions | {r["question"] for r in seen + unseen})
    # every training row comes from a training phrasing, every held-out row from a held-out one
    facts = {f["id"]: f for f in read_jsonl(built.facts)}
    for rows, templates in ((train, pydocs.TRAIN_TEMPLATES), (seen + unseen, pydocs.HELDOUT_TEMPLATES),
                             (practice, pydocs.PRACTICE_TEMPLATES)):
        for row in rows:
            f = facts[row["id"]]
            phrasings = {t.format(qualname=f["id"], name=f["name"], module=f["module"], kind=f["kind"])
                         for t in templates}
            assert row["question"] in phrasings and row["answer"] == f["purpose"]


def test_facts_file_agrees_with_the_splits(built):
    facts = read_jsonl(built.facts)
    by_split = {s: {f["id"] for f in facts if f["split"] == s} for s in ("train", "unseen", "unused")}
    assert by_split["train"] == {r["id"] for r in read_jsonl(built.train)}
    assert by_split["unseen"] == {r["id"] for r in read_jsonl(built.unseen)}
    assert len(facts) == len({f["id"] for f in facts}) == sum(map(len, by_split.values()))
    # no module crowds out the rest of the library
    per_module = Counter(f["module"] for f in facts if f["split"] != "unused")
    assert max(per_module.values()) <= math.ceil(pydocs.MAX_MODULE_SHARE * 800)


def test_each_question_has_exactly_one_answer(built):
    facts = read_jsonl(built.facts)
    keys = Counter(normalised(f["purpose"].casefold().rstrip(".")) for f in facts)
    assert max(keys.values()) == 1
    for f in facts:
        words = len(f["purpose"].split())
        assert pydocs.MIN_PURPOSE_WORDS <= words <= pydocs.MAX_PURPOSE_WORDS, f


def test_every_answer_is_in_its_module_corpus_file(built):
    # The RAG store must hold what the unseen questions ask about.
    corpus = {p.stem: normalised(p.read_text(encoding="utf-8")) for p in built.corpus_dir.glob("*.txt")}
    for row in read_jsonl(built.unseen) + read_jsonl(built.seen):
        assert normalised(row["answer"]) in corpus[row["module"]], row["id"]


def test_no_run_dependent_text(built):
    for path in built.root.rglob("*"):
        if path.is_file():
            assert " at 0x" not in path.read_text(encoding="utf-8"), path


def test_routing_and_keywords_are_well_formed(built):
    facts = {f["id"]: f for f in read_jsonl(built.facts)}
    routing_train, routing_test = read_jsonl(built.routing_train), read_jsonl(built.routing_test)
    labels = {r["output"] for r in routing_train}
    assert 10 <= len(labels) <= 20 and {r["output"] for r in routing_test} <= labels
    assert not {r["input"] for r in routing_train} & {r["input"] for r in routing_test}
    trained_purposes = {f["purpose"] for f in facts.values() if f["split"] == "train"}
    for row in routing_train + routing_test:
        assert set(row) == {"input", "output", "id", "module"} and row["output"] == row["module"]
        assert row["input"].startswith(pydocs.ROUTING_PROMPT.format(text=""))
    for row in routing_test:
        assert row["input"].split("? ", 1)[1] not in trained_purposes
    keywords_train, keywords_test = read_jsonl(built.keywords_train), read_jsonl(built.keywords_test)
    for rows, split in ((keywords_train, "train"), (keywords_test, "unseen")):
        for row in rows:
            f = facts[row["output"]]
            assert f["split"] == split
            assert row["input"] == pydocs.KEYWORDS_PROMPT.format(text=f["purpose"])


@pytest.mark.parametrize("doc, purpose", [
    ("Return the square root of x.", "Return the square root of x."),
    ("chain(*iterables) --> chain object\n\nReturn a chain object whose .__next__() method returns items.",
     "Return a chain object whose .__next__() method returns items."),
    ("Split the path, e.g. into its parts. Then more.", "Split the path, e.g. into its parts."),
    ("Serialize ``obj`` as a JSON\n    formatted stream to ``fp``.\n\nMore.",
     "Serialize obj as a JSON formatted stream to fp."),
    ("Too short.", None),
    ("Subclass of ValueError with the following additional properties:", None),
    ("Point(x, y)", None),
    ("", None),
])
def test_purpose_is_the_first_clean_sentence(doc, purpose):
    assert pydocs._purpose(stdlib_docs.clean_doc(doc)) == purpose


def test_signature_hides_defaults_whose_repr_varies():
    def f(a, b=None, c="x", d=(1, 2), e=object(), g=sys.stdout):
        pass
    assert stdlib_docs.signature(f) == "(a, b=None, c='x', d=(1, 2), e=..., g=...)"


def test_subset_build_and_user_errors(tmp_path):
    paths = build_pydocs(tmp_path / "small", facts=20, eval_examples=10, progress=False, modules=SMALL)
    assert sorted(p.stem for p in paths.corpus_dir.glob("*.txt")) == sorted(SMALL)
    assert {r["module"] for r in read_jsonl(paths.train)} <= set(SMALL)
    with pytest.raises(UserError, match="not empty"):
        build_pydocs(paths.root, facts=20, eval_examples=10, progress=False, modules=SMALL)
    with pytest.raises(UserError, match="ask for fewer"):
        build_pydocs(tmp_path / "big", facts=100_000, progress=False, modules=SMALL)
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        build_pydocs(tmp_path / "bad", progress=False, modules=["no_such_module"])


def test_load_or_build_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIZE_CACHE", str(tmp_path / "cache"))
    first = load_or_build(facts=20, eval_examples=10, modules=SMALL)  # progress bar on: must not break
    assert first.root.parent == tmp_path / "cache" / "pydocs"
    stamp = first.manifest.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the cache was current")

    with monkeypatch.context() as m:
        m.setattr(pydocs, "build_pydocs", no_build)
        again = load_or_build(facts=20, eval_examples=10, modules=SMALL, progress=False)
    assert again == first and again.manifest.stat().st_mtime_ns == stamp
    # Other parameters live next to it; a damaged cache or rebuild=True builds again, in place.
    other = load_or_build(facts=21, eval_examples=10, modules=SMALL, progress=False)
    assert other.root != first.root and first.manifest.exists()
    first.train.write_text("{}\n")
    repaired = load_or_build(facts=20, eval_examples=10, modules=SMALL, progress=False)
    assert repaired == first and read_jsonl(repaired.train)[0].get("question")
    stamp = repaired.manifest.stat().st_mtime_ns
    rebuilt = load_or_build(facts=20, eval_examples=10, modules=SMALL, progress=False, rebuild=True)
    assert rebuilt == first and rebuilt.manifest.stat().st_mtime_ns != stamp
    leftovers = sorted(p.name for p in (tmp_path / "cache" / "pydocs").iterdir())
    assert leftovers == sorted([first.root.name, other.root.name])  # no temporary folders left


def test_default_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIZE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SPECIALIZE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "specialize"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "specialize"
