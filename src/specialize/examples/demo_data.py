"""The demo's data beyond pydocs: the RAG store and the fine-tuning rows (Q&A, reading, agent).

    write_passages(data.corpus_dir, out / "rag_passages.jsonl", 64, 16)
    write_training_data(cfg, data, passages, out / "finetune_data.jsonl", out / "agent_data.jsonl")

`specialize.demo` runs these; they are here so that what the model is taught reads in one place.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import textwrap
from pathlib import Path

from specialize.config import DemoConfig
from specialize.data.io import jsonl_lines
from specialize.examples.pydocs import PydocsPaths
from specialize.files import write_jsonl

# Share of the trained facts' phrasings asked with search_docs offered and answered directly (agent
# on): what teaches the model not to search for what it knows. Drawn after rag_fraction's share.
AGENT_DIRECT_FRACTION = 0.4
# One in SEARCH_SHARE reading-practice functions is also a search trajectory: about as many rows as the
# direct ones, so that neither "search" nor "answer" is what the tool's presence alone predicts.
SEARCH_SHARE = 4


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


# --- the fine-tuning rows ------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for _, line in jsonl_lines(Path(path).read_text(encoding="utf-8")) if line.strip()]


def norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _pick(seed: int, key: str, n: int) -> int:
    """A deterministic choice in range(n) for (seed, key), the same on every machine."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") % n


def _search_row(question: str, answer: str, result: str) -> list[dict]:
    """An agent trajectory: the question, a search_docs call with it, the passages back, the answer."""
    from specialize.tools import openai_call

    call = openai_call("search_docs", {"query": question}, call_id="call_0")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": result}, {"role": "assistant", "content": answer}]


def write_training_data(cfg: DemoConfig, data: PydocsPaths, passages: Path, path: Path,
                        agent_path: Path | None = None) -> dict[str, int]:
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

    With `agent_path` (messages with the search_docs tool offered, the shape tool calls need):
    - direct: AGENT_DIRECT_FRACTION of the trained facts' phrasings, answered without a call;
    - search: one in SEARCH_SHARE reading facts again, in another phrasing, as a trajectory: a
      search_docs call with the question, the retrieved passage as its result, the answer.
    So the model sees the tool offered for what it knows (answer) and for what it does not
    (search). Returns the row counts.
    """
    from specialize.evaluate.agent import TOOLS, search_result
    from specialize.examples.pydocs import TRAIN_TEMPLATES
    from specialize.retrieval import Retriever, rag_prompt

    retriever = Retriever.build(passages)
    rng = random.Random(cfg.seed)
    closed = read_jsonl(data.train)
    rows, with_context, agent_rows = [], [], []
    for row in closed:
        draw = rng.random()
        if draw < cfg.rag_fraction:
            with_context.append(row)
        elif agent_path is not None and draw < cfg.rag_fraction + AGENT_DIRECT_FRACTION:
            agent_rows.append({"tools": TOOLS, "messages": [{"role": "user", "content": row["question"]},
                                                            {"role": "assistant", "content": row["answer"]}],
                               "id": row["id"], "module": row["module"], "kind": "direct"})
        else:
            rows.append(row | {"kind": "closed_book"})
    found = retriever.search_many([row["question"] for row in with_context], cfg.top_k)
    rows += [row | {"question": rag_prompt(row["question"], hits), "kind": "context"}
             for row, hits in zip(with_context, found)]

    # The shortest purposes first, like pydocs' own splits: answers a tiny model can copy.
    others = sorted((f for f in read_jsonl(data.facts) if f["split"] == "unused"),
                    key=lambda f: (len(f["purpose"].split()), len(f["purpose"]), f["id"]))[: cfg.reading_facts]
    questions = [TRAIN_TEMPLATES[_pick(cfg.seed, f["id"], len(TRAIN_TEMPLATES))].format(
        qualname=f["id"], name=f["name"], module=f["module"], kind=f["kind"]) for f in others]
    reading = 0
    for fact, question, hits in zip(others, questions, retriever.search_many(questions, cfg.top_k)):
        if any(norm(fact["purpose"]) in norm(p.text) for p in hits):
            rows.append({"question": rag_prompt(question, hits), "answer": fact["purpose"], "id": fact["id"],
                         "module": fact["module"], "kind": "reading"})
            reading += 1
    write_jsonl(path, rows)
    counts = {"closed_book": len(closed) - len(with_context) - len(agent_rows), "context": len(with_context),
              "reading": reading}
    if agent_path is None:
        return counts
    direct = len(agent_rows)
    # Another phrasing than the reading row's, so the pair is two questions, not one asked twice.
    searched = [f for f in others if _pick(cfg.seed, "search\0" + f["id"], SEARCH_SHARE) == 0]
    questions = [TRAIN_TEMPLATES[(_pick(cfg.seed, f["id"], len(TRAIN_TEMPLATES)) + 1) % len(TRAIN_TEMPLATES)].format(
        qualname=f["id"], name=f["name"], module=f["module"], kind=f["kind"]) for f in searched]
    for fact, question, hits in zip(searched, questions, retriever.search_many(questions, cfg.top_k)):
        if any(norm(fact["purpose"]) in norm(p.text) for p in hits):
            agent_rows.append({"tools": TOOLS, "messages": _search_row(question, fact["purpose"], search_result(hits)),
                               "id": fact["id"], "module": fact["module"], "kind": "search"})
    write_jsonl(agent_path, agent_rows)
    return counts | {"direct": direct, "search": len(agent_rows) - direct}
