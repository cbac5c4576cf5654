"""`specialize demo`: the whole life cycle on the Python standard library's own documentation.

    specialize demo --out runs/demo

1. pydocs (`specialize.examples.pydocs`): the installed stdlib docs → corpus + Q&A splits (cached);
2. passages: the corpus cut at each documented object → `DIR/rag_passages.jsonl`, the RAG store;
3. base: a tiny Llama pre-trained from random weights on the corpus, cached under
   `default_cache_dir()/demo-base/<key>/` and reused by later runs (`--rebuild` retrains it);
4. fine-tune: full weights on the Q&A (closed-book, and some with the retrieved passage) plus
   reading practice on other functions' passages, so that the model learns the facts and how
   to read context → `DIR/finetune_data.jsonl`, `DIR/finetuned/`;
5. compare (`specialize.evaluate.compare`): base, base+rag, finetuned, finetuned+rag on `seen`
   (trained facts, new phrasings) and `unseen` (facts only the documents hold)
   → `DIR/scorecard.json`, `DIR/report.html`, `DIR/predictions/`;
6. a plain-words summary of what the numbers mean.

Budgets are step counts, not minutes: the same config trains as much on every machine,
which is what makes the base cacheable (a time budget would train a different model on a
busy laptop than on an idle one, under the same cache key). The defaults are calibrated for
an idle 2-core CPU: about 3.5 minutes of pre-training (once) and 2 of fine-tuning; a warm run
(cached base) takes under 3 minutes in all, a cold one about 6.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path

from rich.console import Console

from specialize.cache import build_into_place, default_cache_dir
from specialize.config import CompareConfig, DemoConfig, FinetuneConfig, PretrainConfig
from specialize.data.io import jsonl_lines
from specialize.evaluate.scorecard import Scorecard
from specialize.examples.pydocs import PydocsPaths, load_or_build
from specialize.files import write_atomic, write_json, write_jsonl

console = Console(stderr=True, markup=False)  # paths are printed verbatim

# Bump when the way the base is trained changes without a DemoConfig field changing.
BASE_FORMAT = 2  # 2: held-out documents, not blocks
BASE_MARKER = "demo_base.json"  # written last into a cached base: its key inputs and build time
PRETRAIN_BLOCK_TOKENS = 256
PRETRAIN_BATCH_BLOCKS = 16
SYSTEMS = ("base", "base+rag", "finetuned", "finetuned+rag")


# --- the RAG store -------------------------------------------------------------------------------


def write_passages(corpus_dir: Path, path: Path, chunk_words: int, overlap_words: int) -> int:
    """One passage per documented object (longer ones in windows), titled by its dotted name.

    A corpus file is the module docstring followed by one section per function, class or method,
    each opening with its signature at the start of a line (see pydocs `_render_module`). Cutting
    there instead of every N words keeps a docstring whole and alone, so the top passage for
    "what does json.dumps do?" starts with json.dumps's own purpose; the title repeats the name,
    which BM25 then weighs like a heading. Returns the number of passages written.
    """
    from specialize.retrieval import chunk_text

    rows = []
    for file in sorted(Path(corpus_dir).glob("*.txt")):
        module = file.stem
        entry_head = re.compile(r"^(?:class )?(" + re.escape(module) + r"\.[\w.]+)\(")
        sections: list[tuple[str, list[str]]] = [(module, [])]  # (title, lines)
        for line in file.read_text(encoding="utf-8").splitlines():
            head = entry_head.match(line)
            if head:
                sections.append((head.group(1), []))
            sections[-1][1].append(line)
        for title, lines in sections:
            # Docstrings are indented under their signature; dedented, a passage's sentences start
            # with the same tokens as an answer does ("Return", not " Return"), so copying is exact.
            text = (lines[0] + "\n" + textwrap.dedent("\n".join(lines[1:]))).strip()
            if not text:
                continue
            chunks = chunk_text(text, chunk_words, overlap_words)
            for n, chunk in enumerate(chunks, start=1):
                source = f"{file.name}:{title}" + (f"#{n}" if len(chunks) > 1 else "")
                rows.append({"text": chunk, "title": title, "source": source})
    write_jsonl(path, rows)
    return len(rows)


# --- the cached base -----------------------------------------------------------------------------


def _python_tag() -> str:
    return f"{sys.implementation.name}-{platform.python_version()}-{sys.platform}"


def corpus_sha256(corpus_dir: Path) -> str:
    """Hash of the corpus files: the base depends on them only, not on the Q&A splits."""
    digest = hashlib.sha256()
    for path in sorted(Path(corpus_dir).glob("*.txt")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def base_key(cfg: DemoConfig, data: PydocsPaths) -> tuple[str, dict]:
    """(cache folder name, the inputs it stands for): pre-training settings + corpus + Python.

    The corpus hash stands in for the pydocs manifest's content hash, which also covers the Q&A
    files: asking for more facts must not retrain the base when the docs are the same.
    """
    inputs = {"format": BASE_FORMAT, "python": _python_tag(), "corpus_sha256": corpus_sha256(data.corpus_dir),
              "size": cfg.size, "vocab_size": cfg.vocab_size, "steps": cfg.pretrain_steps,
              "learning_rate": cfg.pretrain_learning_rate, "block_tokens": PRETRAIN_BLOCK_TOKENS,
              "batch_blocks": PRETRAIN_BATCH_BLOCKS, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.size}-v{cfg.vocab_size}-s{cfg.pretrain_steps}-{digest}", inputs


def _is_complete(folder: Path, inputs: dict) -> bool:
    try:
        marker = json.loads((folder / BASE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("inputs") == inputs and (folder / "model" / "config.json").is_file()


def load_or_pretrain_base(cfg: DemoConfig, data: PydocsPaths, cache_dir: Path) -> tuple[Path, bool]:
    """The cached base run folder for this config, pre-trained first if missing; (folder, reused).

    Pre-training writes into a temporary sibling that is renamed into place once complete, with
    BASE_MARKER written last, so an interrupted run never leaves a base that looks finished.
    """
    from specialize.pretrain import pretrain

    name, inputs = base_key(cfg, data)
    final = cache_dir / "demo-base" / name
    if not cfg.rebuild and _is_complete(final, inputs):
        return final, True

    def build(tmp: Path) -> None:
        pretrain(PretrainConfig(
            data=[str(data.corpus_dir)], out=tmp, size=cfg.size, vocab_size=cfg.vocab_size,
            max_steps=cfg.pretrain_steps, learning_rate=cfg.pretrain_learning_rate,
            max_seq_tokens=PRETRAIN_BLOCK_TOKENS, micro_batch_size=PRETRAIN_BATCH_BLOCKS,
            save_every=cfg.pretrain_steps, eval_every=cfg.pretrain_steps, seed=cfg.seed,
            progress=cfg.progress))
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # nothing resumes a cached base
        shutil.rmtree(tmp / "data", ignore_errors=True)  # nor needs its token files
        for record_name in ("config.yaml", "train_summary.json"):  # written naming the temporary folder
            record = tmp / record_name
            write_atomic(record, record.read_text(encoding="utf-8").replace(str(tmp), str(final)))
        write_json(tmp / BASE_MARKER, {"inputs": inputs, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    build_into_place(final, build, lambda folder: _is_complete(folder, inputs))
    return final, False


# --- fine-tuning and comparing -------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for _, line in jsonl_lines(Path(path).read_text(encoding="utf-8")) if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _pick(seed: int, key: str, n: int) -> int:
    """A deterministic choice in range(n) for (seed, key), the same on every machine."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") % n


def write_training_data(cfg: DemoConfig, data: PydocsPaths, passages: Path, path: Path) -> dict[str, int]:
    """The fine-tuning set: the Q&A, some of it with context, plus practice in reading context.

    - closed book: every training phrasing of every `train` fact, as pydocs wrote it;
    - with context: `rag_fraction` of those rows get the retrieved passage in front of the
      question (`rag_prompt`, the prompt compare's RAG systems send), so that context about a
      known fact does not throw the model off;
    - reading practice: `reading_facts` facts from outside both test splits, each asked once,
      always with its retrieved passage, kept only where the passage holds the answer.

    The reading rows are what teach the model to use context at all. For a fact it has to
    memorise anyway (it is also asked closed-book), copying from the passage never lowers the
    loss, so a model trained on the Q&A with context in some prompts ignores passages: RAG added
    +0.02 F1 on unseen facts. Reading rows must be many and each asked once, or a model this small
    memorises them too (750 of them: +0.04); with ~2,300 it gained +0.14 to +0.19.

    Context goes into the prompts here rather than through `finetune --rag-docs`, which gives
    it to a random share of all rows alike; the reading rows need it on every one of them.
    Returns the row counts.
    """
    from specialize.examples.pydocs import TRAIN_TEMPLATES
    from specialize.retrieval import Retriever, rag_prompt

    retriever = Retriever.build(passages)
    rng = random.Random(cfg.seed)
    closed = _read_jsonl(data.train)
    rows, with_context = [], []
    for row in closed:
        if rng.random() < cfg.rag_fraction:
            with_context.append(row)
        else:
            rows.append(row | {"kind": "closed_book"})
    found = retriever.search_many([row["question"] for row in with_context], cfg.top_k)
    rows += [row | {"question": rag_prompt(row["question"], hits), "kind": "context"}
             for row, hits in zip(with_context, found)]

    # The shortest purposes first, like pydocs' own splits: answers a tiny model can copy.
    others = sorted((f for f in _read_jsonl(data.facts) if f["split"] == "unused"),
                    key=lambda f: (len(f["purpose"].split()), len(f["purpose"]), f["id"]))[: cfg.reading_facts]
    questions = [TRAIN_TEMPLATES[_pick(cfg.seed, f["id"], len(TRAIN_TEMPLATES))].format(
        qualname=f["id"], name=f["name"], module=f["module"], kind=f["kind"]) for f in others]
    reading = 0
    for fact, question, hits in zip(others, questions, retriever.search_many(questions, cfg.top_k)):
        if any(_norm(fact["purpose"]) in _norm(p.text) for p in hits):
            rows.append({"question": rag_prompt(question, hits), "answer": fact["purpose"], "id": fact["id"],
                         "module": fact["module"], "kind": "reading"})
            reading += 1
    write_jsonl(path, rows)
    return {"closed_book": len(closed) - len(with_context), "context": len(with_context), "reading": reading}


def finetune_config(cfg: DemoConfig, base: Path, training_data: Path, out: Path) -> FinetuneConfig:
    """Full fine-tuning on `write_training_data`'s rows (their context is already in the prompts)."""
    return FinetuneConfig(
        base=str(base), data=[str(training_data)], out=out, method="full", template="qa",
        max_steps=cfg.finetune_steps, learning_rate=cfg.finetune_learning_rate,
        micro_batch_size=cfg.finetune_batch_size, eval_fraction=0.0, save_every=cfg.finetune_steps,
        seed=cfg.seed, progress=cfg.progress)


def compare_config(cfg: DemoConfig, base: Path, run: Path, data: PydocsPaths, passages: Path,
                   out: Path) -> CompareConfig:
    """What `specialize compare` would be given: base, run, the two splits and the RAG store."""
    return CompareConfig(base=str(base), model=str(run), data=[str(data.seen), str(data.unseen)],
                         docs=str(passages), task="qa", top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.eval_batch_size, out=out)


def retrieval_hits(out: Path) -> dict[str, float]:
    """Per split: share of RAG prompts whose passages hold the reference answer word for word.

    Read from the predictions compare wrote, so it is exactly the context the models were shown.
    """
    hits = {}
    for file in sorted((out / "predictions" / "finetuned+rag").glob("*.jsonl")):
        rows = _read_jsonl(file)
        found = [any(_norm(ref) in _norm(row.get("context") or "") for ref in
                     ([row["reference"]] if isinstance(row["reference"], str) else row["reference"]))
                 for row in rows]
        hits[file.stem] = sum(found) / max(len(found), 1)
    return hits


# --- the summary ---------------------------------------------------------------------------------


DESCRIPTIONS = {
    "base": "the pre-trained model, asked the question as is",
    "base+rag": "the same, with the best-matching passage of the docs above the question",
    "finetuned": "the base after fine-tuning on the Q&A",
    "finetuned+rag": "the fine-tuned model, with the passage above the question",
}


def summary_lines(scorecard: dict, hits: dict[str, float], timings: dict[str, float], out: Path) -> list[str]:
    """What each system is, what its numbers say, and what to do about it, in plain words."""
    metrics = {s["name"]: s["splits"] for s in scorecard["systems"]}

    def f1(system: str, split: str) -> float:
        return metrics.get(system, {}).get(split, {}).get("f1", 0.0)

    lines = ["F1 = word overlap with the documented answer (0 = no word right, 1 = all); EM = exact match;",
             "stop = share of answers that ended on their own. 'seen' asks about facts trained on, in phrasings",
             "never trained on; 'unseen' asks about functions never trained on: only the docs know those.", ""]
    for name in SYSTEMS:
        if name in metrics:
            cells = "   ".join(f"{split} F1 {m['f1']:.2f} EM {m['exact_match']:.2f} "
                               f"stop {m.get('stop_rate', 0):.2f}" for split, m in metrics[name].items())
            lines.append(f"  {name:<14} {cells}   ({DESCRIPTIONS[name]})")
    lines += [
        "",
        (f"- Fine-tuning taught the trained facts: F1 on seen went from {f1('base', 'seen'):.2f} to "
         f"{f1('finetuned', 'seen'):.2f}, asked in words the model had never seen with them."
         if f1("finetuned", "seen") >= f1("base", "seen") + 0.1 else
         f"- Fine-tuning barely moved F1 on seen ({f1('base', 'seen'):.2f} -> {f1('finetuned', 'seen'):.2f}): "
         "too few steps to learn the facts (raise finetune_steps)."),
        "- It cannot know what it never saw: on unseen, the fine-tuned model scores "
        f"{f1('finetuned', 'unseen'):.2f}; given the retrieved passage, {f1('finetuned+rag', 'unseen'):.2f} "
        f"({f1('finetuned+rag', 'unseen') - f1('finetuned', 'unseen'):+.2f}).",
    ]
    if "unseen" in hits:
        lines.append(f"- Retrieval put the passage holding the answer first for {hits['unseen']:.0%} of the unseen "
                     "questions; where it did, a model this small still copies the answer imperfectly.")
    lines.append(f"- The base does not use passages ({f1('base', 'unseen'):.2f} -> {f1('base+rag', 'unseen'):.2f} "
                 "on unseen): reading context is learnt, which is why the fine-tuning set has reading practice.")
    rec = scorecard.get("recommendation")
    if rec:
        lines.append(f"Recommendation: {rec['system']} (the reasons are listed under the table above).")
    lines.append("For your own data: fine-tune on what users ask again and again, retrieve for everything else.")
    lines.append("Time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
                 + f". Details: {out / 'report.html'}")
    return lines


# --- the whole demo ------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns the scorecard (also in `cfg.out/scorecard.json`)."""
    from specialize.evaluate.compare import compare
    from specialize.finetune import finetune

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = default_cache_dir()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal started
        now = time.perf_counter()
        timings[stage] = now - started
        started = now

    console.rule("1/5 data: the standard library's docs → corpus and Q&A (pydocs)")
    data = load_or_build(cache_dir, facts=cfg.facts, eval_examples=cfg.eval_examples, seed=cfg.seed,
                         rebuild=cfg.rebuild, progress=cfg.progress, modules=cfg.modules)
    counts = json.loads(data.manifest.read_text(encoding="utf-8"))["counts"]
    passages = out / "rag_passages.jsonl"
    n_passages = write_passages(data.corpus_dir, passages, cfg.passage_words, cfg.passage_words // 4)
    console.print(f"pydocs: {counts['modules']} modules, {counts['corpus_chars']:,} characters of docs; "
                  f"{counts['train_facts']} train facts x {counts['train'] // max(counts['train_facts'], 1)} "
                  f"phrasings, {counts['seen']} seen and {counts['unseen']} unseen test questions; "
                  f"{n_passages:,} passages for retrieval → {data.root}")
    lap("data")

    console.rule("2/5 base: pre-train a tiny model from random weights on the docs")
    base, reused = load_or_pretrain_base(cfg, data, cache_dir)
    console.print(("reusing the cached base " if reused else "cached the base in ") + str(base))
    lap("pretrain")

    console.rule("3/5 fine-tune: full weights on the Q&A, with retrieved context in some prompts")
    training_data = out / "finetune_data.jsonl"
    rows = write_training_data(cfg, data, passages, training_data)
    console.print(f"fine-tuning data: {rows['closed_book']:,} closed-book questions, {rows['context']:,} with "
                  f"their retrieved passage, {rows['reading']:,} reading-practice questions about other "
                  f"functions → {training_data}")
    run = finetune(finetune_config(cfg, base, training_data, out / "finetuned"))
    lap("finetune")

    console.rule("4/5 compare: base, base+rag, finetuned, finetuned+rag on seen and unseen")
    scorecard = compare(compare_config(cfg, base, run, data, passages, out), progress=cfg.progress)
    lap("evaluate")

    hits = retrieval_hits(out)
    card = Scorecard.model_validate(scorecard)
    card.demo = {"config": cfg.model_dump(mode="json"), "base": str(base), "base_reused": reused,
                 "finetune_rows": rows, "retrieval_hit_rate": hits, "seconds": timings}
    scorecard = card.to_json()
    write_json(out / "scorecard.json", scorecard)
    console.rule("5/5 what the numbers mean")
    print("\n".join(summary_lines(scorecard, hits, timings, out)), flush=True)  # plain: no wrapping, no markup
    return scorecard
