"""`specialize demo --updates`: some facts change; fine-tune the specialist on the changes, or retrieve?

    specialize demo --updates --out runs/demo     # after (or including) `specialize demo --out runs/demo`

A library's behaviour changes between versions, and the docs change with it. The scenario, on the
demo's pydocs data and its fine-tuned specialist (`DIR/finetuned`, made by the demo first if missing):
1. changes: UPDATED_FACTS trained facts get a new answer. The change is counterfactual, as in the
   knowledge-editing literature (CounterFact): the new answer is another, untrained function's
   documented purpose, so the old and the new answer share few words and a stale answer is
   unmistakable;
2. updated docs: the RAG store with each changed fact's passage rewritten to the new answer
   (`DIR/updates/passages.jsonl`);
3. updated specialists, fine-tuned from the specialist on the changes in the six training phrasings
   (`updates.jsonl`): alone, and with the unchanged facts' training rows replayed (`finetune
   --replay-data`, half of the trained tokens) so the rest stays right;
4. scored on the changed facts in the training phrasings and in paraphrases (update success: F1
   and exact match against the new answer; stale: the answer is closer to the old answer than to
   the new one, F1 >= 0.5 against the old), and on the unchanged trained facts (locality: F1), for
   the specialist before the update, with RAG over the updated docs, and the updated specialists
   → `DIR/updates/updates.json` and a table.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from rich.console import Console

from specialize.config import DemoConfig, FinetuneConfig
from specialize.files import write_json, write_jsonl

console = Console(stderr=True, markup=False)

UPDATED_FACTS = 50
UPDATE_EPOCHS = 6
UPDATE_LEARNING_RATE = 1e-3
REHEARSAL_FRACTION = 0.5
MAX_NEW_ANSWER_WORDS = 12  # new answers as short as the demo's trained ones: learnable by a tiny model
STALE_F1 = 0.5
PARAPHRASES = 2  # of the 4 held-out phrasings, per changed fact (each fact's own, chosen by its id)
UNCHANGED_QUESTIONS = 100  # seen questions about facts that did not change (locality)


def _unit(seed: int, *parts: str) -> float:
    return int.from_bytes(hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()[:8], "big") / 2**64


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def choose_changes(facts: list[dict], seen: list[dict], n: int, seed: int) -> list[dict]:
    """`n` trained facts asked in the seen split, each with a new answer: the purpose of an untrained
    fact of the same kind (short, different words). Deterministic for a seed."""
    seen_ids = {row["id"] for row in seen}
    trained = sorted((f for f in facts if f["split"] == "train" and f["id"] in seen_ids),
                     key=lambda f: _unit(seed, "change", f["id"]))[:n]
    donors = sorted((f for f in facts if f["split"] == "unused" and len(f["purpose"].split()) <= MAX_NEW_ANSWER_WORDS),
                    key=lambda f: _unit(seed, "donor", f["id"]))
    used, changes = set(), []
    for fact in trained:
        words = set(fact["purpose"].lower().split())
        donor = next((d for d in donors if d["id"] not in used and d["kind"] == fact["kind"]
                      and len(words & set(d["purpose"].lower().split())) <= 2), None)
        if donor is None:
            continue
        used.add(donor["id"])
        changes.append(fact | {"old": fact["purpose"], "new": donor["purpose"], "donor": donor["id"]})
    return changes


def _loose(text: str) -> re.Pattern:
    """The text with any run of whitespace matching any other (a docstring wraps its lines)."""
    return re.compile(r"\s+".join(re.escape(word) for word in text.split()))


def update_passages(passages: list[dict], changes: list[dict]) -> tuple[list[dict], int]:
    """The RAG store after the change: the old answer replaced by the new one in the fact's own
    passages; a fact whose passage does not hold it verbatim gets a passage of its own. Returns
    (passages, facts edited in place)."""
    by_title: dict[str, list[int]] = {}
    for i, p in enumerate(passages):
        by_title.setdefault(p.get("title", ""), []).append(i)
    out, edited = [dict(p) for p in passages], 0
    for change in changes:
        pattern, hit = _loose(change["old"]), False
        for i in by_title.get(change["id"], []):
            text, count = pattern.subn(change["new"].replace("\\", "\\\\"), out[i]["text"])
            if count:
                out[i]["text"], hit = text, True
        edited += hit
        if not hit:
            out.append({"title": change["id"], "text": f"{change['id']}{change['signature']}\n{change['new']}",
                        "source": f"update:{change['id']}"})
    return out, edited


def question_sets(changes: list[dict], seen: list[dict]) -> dict[str, list[dict]]:
    """The test sets: changed facts in a training phrasing and in the paraphrases; unchanged seen facts."""
    from specialize.examples.pydocs import HELDOUT_TEMPLATES, TRAIN_TEMPLATES

    def ask(template: str, c: dict) -> dict:
        question = template.format(qualname=c["id"], name=c["name"], module=c["module"], kind=c["kind"])
        return {"question": question, "answer": c["new"], "old_answer": c["old"], "id": c["id"]}

    changed = {c["id"] for c in changes}
    return {
        "changed_trained": [ask(TRAIN_TEMPLATES[int(_unit(0, "t", c["id"]) * len(TRAIN_TEMPLATES))], c) for c in changes],
        "changed_paraphrased": [ask(t, c) for c in changes for t in sorted(
            HELDOUT_TEMPLATES, key=lambda t: _unit(0, "p", c["id"], t))[:PARAPHRASES]],
        "unchanged": [row for row in seen if row["id"] not in changed][:UNCHANGED_QUESTIONS],
    }


def update_rows(changes: list[dict]) -> list[dict]:
    """The fine-tuning data of the update: every changed fact in every training phrasing, new answer."""
    from specialize.examples.pydocs import TRAIN_TEMPLATES

    return [{"question": t.format(qualname=c["id"], name=c["name"], module=c["module"], kind=c["kind"]),
             "answer": c["new"], "id": c["id"]} for c in changes for t in TRAIN_TEMPLATES]


def score_rows(rows: list[dict], questions: list[dict]) -> dict:
    """Update success (F1 / EM against the reference), and on changed facts the stale rate: answers
    closer to the old answer than to the new one, with F1 >= STALE_F1 against the old."""
    from specialize.evaluate.metrics import exact_match, token_f1

    f1 = [token_f1(r["prediction"], [q["answer"]]) for r, q in zip(rows, questions)]
    out = {"f1": sum(f1) / len(f1), "exact_match": sum(exact_match(r["prediction"], [q["answer"]])
                                                      for r, q in zip(rows, questions)) / len(rows), "n": len(rows)}
    if "old_answer" in questions[0]:
        old = [token_f1(r["prediction"], [q["old_answer"]]) for r, q in zip(rows, questions)]
        out["stale_rate"] = sum(o >= STALE_F1 and o > n for o, n in zip(old, f1)) / len(rows)
        out["old_f1"] = sum(old) / len(old)
    return out


def _evaluate(model: str, sets: dict[str, Path], questions: dict[str, list[dict]], cfg: DemoConfig,
              docs: Path | None) -> dict:
    from specialize.evaluate.systems import evaluate_system, load_test_examples
    from specialize.generate import Generator
    from specialize.retrieval import Retriever

    generator = Generator.load(model)
    retriever = Retriever.build(docs) if docs else None
    scores = {}
    for name, path in sets.items():
        result = evaluate_system(generator, load_test_examples(str(path)), "qa", retriever, top_k=cfg.top_k,
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
        scores[name] = score_rows(result.rows, questions[name])
    return scores


def run_updates(cfg: DemoConfig) -> dict:
    """The knowledge-update scenario; returns (and writes) `DIR/updates/updates.json`."""
    from specialize.cache import default_cache_dir
    from specialize.demo import run_demo
    from specialize.examples.pydocs import load_or_build
    from specialize.finetune import finetune

    out = Path(cfg.out)
    specialist = out / "finetuned"
    if not (specialist / "train_summary.json").is_file() or not (out / "rag_passages.jsonl").is_file():
        console.rule("the specialist first: `specialize demo`")
        run_demo(cfg.model_copy(update={"updates": False}))
    data = load_or_build(default_cache_dir(), facts=cfg.facts, eval_examples=cfg.eval_examples, seed=cfg.seed,
                         progress=cfg.progress, modules=cfg.modules)
    folder = out / "updates"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    console.rule("1/3 the changes: trained facts get a new answer, the docs change with them")
    changes = choose_changes(_read(data.facts), _read(data.seen), UPDATED_FACTS, cfg.seed)
    passages, edited = update_passages(_read(out / "rag_passages.jsonl"), changes)
    write_jsonl(folder / "changes.jsonl", changes)
    write_jsonl(folder / "passages.jsonl", passages)
    questions = question_sets(changes, _read(data.seen))
    sets = {name: folder / f"{name}.jsonl" for name in questions}
    for name, rows in questions.items():
        write_jsonl(sets[name], rows)
    changed = {c["id"] for c in changes}
    write_jsonl(folder / "updates.jsonl", update_rows(changes))
    write_jsonl(folder / "rehearsal.jsonl", [r for r in _read(data.train) if r["id"] not in changed])
    console.print(f"{len(changes)} facts changed ({edited} edited in their passages, the rest given one); "
                  f"{len(questions['changed_paraphrased'])} paraphrased questions about them, "
                  f"{len(questions['unchanged'])} about unchanged trained facts → {folder}")

    console.rule("2/3 fine-tune the specialist on the changes (alone, and with the unchanged facts replayed)")
    runs = {}
    for name, replay in (("updated", []), ("updated+rehearsal", [str(folder / "rehearsal.jsonl")])):
        runs[name] = finetune(FinetuneConfig(
            base=str(specialist), data=[str(folder / "updates.jsonl")], out=folder / name, method="full",
            epochs=UPDATE_EPOCHS, learning_rate=UPDATE_LEARNING_RATE, micro_batch_size=cfg.finetune_batch_size,
            eval_fraction=0.0, replay_data=replay, replay_fraction=REHEARSAL_FRACTION, seed=cfg.seed,
            progress=cfg.progress))
    train_seconds = time.perf_counter() - started

    console.rule("3/3 score: update success, stale answers, locality")
    systems = {"specialist": (specialist, None), "specialist+rag (updated docs)": (specialist, folder / "passages.jsonl"),
               "updated": (runs["updated"], None), "updated+rehearsal": (runs["updated+rehearsal"], None),
               "updated+rehearsal+rag": (runs["updated+rehearsal"], folder / "passages.jsonl")}
    results = {name: _evaluate(str(model), sets, questions, cfg, docs) for name, (model, docs) in systems.items()}
    report = {"changes": len(changes), "edited_passages": edited, "systems": results,
              "settings": {"epochs": UPDATE_EPOCHS, "learning_rate": UPDATE_LEARNING_RATE,
                           "rehearsal_fraction": REHEARSAL_FRACTION, "stale_f1": STALE_F1},
              "seconds": {"update_finetune": train_seconds, "total": time.perf_counter() - started}}
    write_json(folder / "updates.json", report)
    print("\n".join(table_lines(results)), flush=True)
    return report


def table_lines(results: dict) -> list[str]:
    """The numbers as a plain table: success on changed facts, stale answers, locality."""
    lines = [(f"{'system':<31} {'changed F1 (trained / paraphrased)':>35} {'EM para':>8} {'stale':>6} "
             f"{'unchanged F1':>13}")]
    for name, s in results.items():
        lines.append(f"{name:<31} {s['changed_trained']['f1']:>16.3f} / {s['changed_paraphrased']['f1']:<16.3f} "
                     f"{s['changed_paraphrased']['exact_match']:>8.3f} {s['changed_paraphrased']['stale_rate']:>6.2f} "
                     f"{s['unchanged']['f1']:>13.3f}")
    lines.append("changed: facts whose answer changed, asked in a training phrasing / in paraphrases (F1 against the "
                 "new answer); stale: share of paraphrased answers closer to the old answer; unchanged: trained "
                 "facts that did not change (locality)")
    return lines
