"""The knowledge-update scenario: which facts change, the updated docs, and how answers are scored."""

from __future__ import annotations

from specialize.updates import (
    choose_changes,
    question_sets,
    score_rows,
    update_passages,
    update_rows,
)


def _fact(i: int, split: str, purpose: str, kind: str = "function") -> dict:
    return {"id": f"mod.f{i}", "module": "mod", "name": f"f{i}", "kind": kind, "signature": "(x)",
            "purpose": purpose, "split": split}


FACTS = [_fact(0, "train", "Return the square root of x."), _fact(1, "train", "Open a file for reading."),
         _fact(2, "train", "Close the event loop.", kind="method"), _fact(3, "train", "Not asked in seen."),
         _fact(4, "unused", "Encode the object as a JSON formatted string."),
         _fact(5, "unused", "Return the square of x."),  # shares too many words with f0's answer
         _fact(6, "unused", "Stop the running loop.", kind="method"),
         _fact(7, "unused", "Compress bytes with the LZMA algorithm and return them.")]
SEEN = [{"question": f"Tell me what mod.f{i} does.", "answer": FACTS[i]["purpose"], "id": f"mod.f{i}"} for i in range(3)]


def test_changes_are_trained_seen_facts_with_another_functions_answer():
    changes = choose_changes(FACTS, SEEN, 10, seed=0)
    assert sorted(c["id"] for c in changes) == ["mod.f0", "mod.f1", "mod.f2"]  # f3 has no seen question
    for c in changes:
        donor = next(f for f in FACTS if f["id"] == c["donor"])
        assert donor["split"] == "unused" and donor["kind"] == c["kind"] and c["new"] == donor["purpose"]
        assert c["old"] == next(f["purpose"] for f in FACTS if f["id"] == c["id"])
        assert len(set(c["old"].lower().split()) & set(c["new"].lower().split())) <= 2
    assert len({c["donor"] for c in changes}) == 3  # each new answer used once
    assert next(c for c in changes if c["id"] == "mod.f2")["new"] == "Stop the running loop."
    assert choose_changes(FACTS, SEEN, 10, seed=0) == changes


def test_updated_docs_replace_the_old_answer_across_line_breaks():
    changes = [{"id": "mod.f0", "old": "Return the square root of x.", "new": "Encode the object.", "signature": "(x)"},
               {"id": "mod.f1", "old": "Open a file for reading.", "new": "Stop it.", "signature": "(path)"}]
    passages = [{"title": "mod.f0", "text": "mod.f0(x)\nReturn the square\nroot of x. More text.", "source": "a"},
                {"title": "mod.other", "text": "Return the square root of x.", "source": "b"}]
    updated, edited = update_passages(passages, changes)
    assert edited == 1
    assert updated[0]["text"] == "mod.f0(x)\nEncode the object. More text."
    assert updated[1] == passages[1]  # another object's passage is not touched
    assert updated[2] == {"title": "mod.f1", "text": "mod.f1(path)\nStop it.", "source": "update:mod.f1"}
    assert passages[0]["text"].startswith("mod.f0(x)\nReturn")  # the input is not changed in place


def test_questions_and_update_rows():
    changes = choose_changes(FACTS, SEEN, 1, seed=0)
    sets = question_sets(changes, SEEN)
    assert len(sets["changed_trained"]) == 1 and len(sets["changed_paraphrased"]) == 2  # PARAPHRASES
    assert all(q["answer"] == changes[0]["new"] and q["old_answer"] == changes[0]["old"]
               for q in sets["changed_paraphrased"])
    assert [q["id"] for q in sets["unchanged"]] == [r["id"] for r in SEEN if r["id"] != changes[0]["id"]]
    rows = update_rows(changes)
    assert len(rows) == 6 and {r["answer"] for r in rows} == {changes[0]["new"]}
    assert not {r["question"] for r in rows} & {q["question"] for q in sets["changed_paraphrased"]}


def test_success_stale_and_locality_scores():
    questions = [{"answer": "Stop the running loop.", "old_answer": "Close the event loop."}] * 4
    predictions = ["Stop the running loop.", "Close the event loop.", "Close the loop.", "Something else."]
    scores = score_rows([{"prediction": p} for p in predictions], questions)
    assert scores["exact_match"] == 0.25
    assert scores["stale_rate"] == 0.5  # the 2nd and 3rd answer the old way; the 4th is neither
    assert scores["old_f1"] > scores["f1"] - 0.5
    unchanged = score_rows([{"prediction": "Open a file for reading."}], [{"answer": "Open a file for reading."}])
    assert unchanged == {"f1": 1.0, "exact_match": 1.0, "n": 1}
