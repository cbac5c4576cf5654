"""The embedded default data set: the installed standard library documents itself.

Every Python install carries documentation nobody on this team wrote. `load_or_build()` turns it
into the demo's data the way a company would use its own docs, once, then from the cache:

    corpus/<module>.txt          plain-text docs of one module: pre-training text and RAG store
    facts.jsonl                  every usable fact {id, module, name, kind, signature, purpose, split}
    train.jsonl                  Q&A about `facts` facts, each in every training phrasing
    seen.jsonl                   trained facts asked in phrasings never used in training
    practice.jsonl               every trained fact in each practice phrasing (neither trained nor
                                 tested): questions for `specialize pairs` and reward tuning
    unseen.jsonl                 facts never trained on (the answer is only in the corpus)
    routing_{train,test}.jsonl   text -> name of the module it documents
    keywords_{train,test}.jsonl  purpose sentence -> qualified name of the function it describes
    manifest.json                Python version, parameters, counts and a content hash

A fact is a documented public function, class or method (read by `stdlib_docs`); its answer
("purpose") is the first sentence of its docstring. Look at the data with
`python -m specialize.examples.pydocs OUT_DIR`.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from specialize.cache import build_into_place, default_cache_dir
from specialize.errors import UserError
from specialize.examples.stdlib_docs import Entry, read_library, render_module, stdlib_modules
from specialize.files import write_json, write_jsonl
from specialize.progress import progress_bar

BUILD_VERSION = 2  # bump whenever a build's output changes for the same Python: it invalidates caches

# Question phrasings. Training uses TRAIN_TEMPLATES only; `seen` and `unseen` ask in HELDOUT_TEMPLATES,
# so a right answer there means the model learnt the fact, not the sentence it was asked in.
TRAIN_TEMPLATES = (
    "What does {qualname} do?",
    "What is the purpose of {name} in the {module} module?",
    "Describe {qualname}.",
    "In Python's {module} module, what does {name} do?",
    "Explain the {kind} {name} from {module}.",
    "What is {qualname} used for?",
)
HELDOUT_TEMPLATES = (
    "Tell me what {qualname} does.",
    "What is the {kind} {name} of the {module} module for?",
    "Summarize the documentation of {qualname}.",
    "I'm reading code that uses {name} from {module}. What does it do?",
)
# A third set, disjoint from both: how users might ask about trained facts in their own words.
# Preference and reward tuning sample the model's answers to these (`practice.jsonl`), so what they
# teach is tested on `seen`'s phrasings, which neither fine-tuning step ever saw.
PRACTICE_TEMPLATES = (
    "Can you explain what {qualname} is for?",
    "Quick question about the {module} module: what's {name}?",
    "What job does the {kind} {qualname} have?",
)
ROUTING_PROMPT = "Which Python module does this text come from? {text}"
KEYWORDS_PROMPT = "Which function, class or method of the Python standard library does this describe? {text}"
ROUTING_MODULES = 16  # the best-populated modules become the routing labels
ROUTING_PER_MODULE = 60  # texts per label at most, so that no label dominates
MAX_MODULE_SHARE = 0.04  # of the train + unseen facts from one module, while others have facts left
MIN_PURPOSE_WORDS, MAX_PURPOSE_WORDS = 4, 30

_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(-+>.*)?$")  # "chain(*iterables) --> chain object"
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z0-9(\"'])")
_LEGAL = re.compile(r"copyright|warrant|liable|licen[cs]e", re.IGNORECASE)  # not prose about the module
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "cf.", "approx."})


@dataclass(frozen=True)
class Fact:
    """One documented public function, class or method: the unit the Q&A splits are made of."""

    id: str  # "json.dumps", "json.JSONDecoder.decode"
    module: str  # "json"
    name: str  # "dumps", "JSONDecoder.decode"
    kind: str  # "function" | "class" | "method"
    signature: str  # "(obj, *, skipkeys=False, ...)"; defaults that vary between runs become ...
    purpose: str  # first sentence of the docstring: the answer
    split: str = "unused"  # "train" | "unseen" | "unused"


@dataclass(frozen=True)
class PydocsPaths:
    """Where a build put each file (see the module docstring for what they hold)."""

    root: Path
    corpus_dir: Path
    facts: Path
    train: Path
    seen: Path
    unseen: Path
    practice: Path
    routing_train: Path
    routing_test: Path
    keywords_train: Path
    keywords_test: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> PydocsPaths:
        root = Path(root)
        names = {f: root / f"{f}.jsonl" for f in ("facts", "train", "seen", "unseen", "practice", "routing_train",
                                                   "routing_test", "keywords_train", "keywords_test")}
        return cls(root=root, corpus_dir=root / "corpus", manifest=root / "manifest.json", **names)


# --- facts and their splits ----------------------------------------------------------------------


def _first_sentence(text: str) -> str:
    for match in _SENTENCE_END.finditer(text):
        if text[: match.end()].rsplit(" ", 1)[-1].lower() not in _ABBREVIATIONS:
            return text[: match.end()]
    return text


def _purpose(doc: str) -> str | None:
    """The first sentence of a docstring, or None when it cannot serve as a one-answer fact."""
    for paragraph in doc.split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        while lines and _SIGNATURE_LINE.match(lines[0]):  # C docstrings often open with a signature
            lines.pop(0)
        if lines:
            break
    else:
        return None
    purpose = _first_sentence(" ".join(" ".join(lines).split()))
    words = purpose.split()
    if not MIN_PURPOSE_WORDS <= len(words) <= MAX_PURPOSE_WORDS or purpose[-1] in ":,;-":
        return None
    if purpose.startswith(("..", ">>>")) or "::" in purpose or words[0].lower().startswith("deprecated"):
        return None
    return purpose


def _purpose_key(purpose: str) -> str:
    return " ".join(purpose.casefold().rstrip(".!?").split())


def _facts(entries: list[Entry]) -> list[Fact]:
    """Entries with a usable purpose; a purpose shared by several entries is ambiguous: all go."""
    facts = [Fact(e.id, e.module, e.name, e.kind, e.signature, p)
             for e in entries if (p := _purpose(e.doc)) is not None]
    uses = Counter(_purpose_key(f.purpose) for f in facts)
    return [f for f in facts if uses[_purpose_key(f.purpose)] == 1]


def _unit(seed: int, *parts: str) -> float:
    """A deterministic pseudo-random number in [0, 1) for (seed, parts)."""
    digest = hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign_splits(facts: list[Fact], n_train: int, n_unseen: int, seed: int) -> list[Fact]:
    """Pick `n_train` train facts and `n_unseen` held-out facts, shortest purposes first.

    Short answers are what a tiny model can learn in a few minutes, so facts are ranked by purpose
    length (words, then characters, then id). No module gets more than MAX_MODULE_SHARE of the
    picks while other modules have facts left, so the subset covers the library rather than
    asyncio alone. Whether a fact is held out depends only on a seeded hash of its id, with the
    share of held-out facts the two sizes ask for, so `unseen` comes from the same ranks as `train`
    and the comparison between them is fair.
    """
    share = n_unseen / (n_train + n_unseen)
    wanted = {"train": n_train, "unseen": n_unseen}
    quota = math.ceil(MAX_MODULE_SHARE * (n_train + n_unseen))
    ranked = sorted(facts, key=lambda f: (len(f.purpose.split()), len(f.purpose), f.id))
    split: dict[str, str] = {}
    per_module: Counter[str] = Counter()
    picked: Counter[str] = Counter()
    for limit in (quota, len(facts)):  # a second pass fills up when few modules are documented
        for f in ranked:
            want = "unseen" if _unit(seed, "unseen", f.id) < share else "train"
            if f.id not in split and per_module[f.module] < limit and picked[want] < wanted[want]:
                split[f.id] = want
                per_module[f.module] += 1
                picked[want] += 1
    return [replace(f, split=split.get(f.id, "unused")) for f in facts]


def _question(template: str, f: Fact) -> dict[str, str]:
    question = template.format(qualname=f.id, name=f.name, module=f.module, kind=f.kind)
    return {"question": question, "answer": f.purpose, "id": f.id, "module": f.module}


def _qa_rows(facts: list[Fact], eval_examples: int, seed: int) -> dict[str, list[dict]]:
    train = [f for f in facts if f.split == "train"]
    seen = sorted(train, key=lambda f: _unit(seed, "seen", f.id))[:eval_examples]

    def heldout(f: Fact) -> dict[str, str]:
        return _question(HELDOUT_TEMPLATES[int(_unit(seed, "phrasing", f.id) * len(HELDOUT_TEMPLATES))], f)

    return {
        "train": [_question(t, f) for f in train for t in TRAIN_TEMPLATES],
        "seen": [heldout(f) for f in sorted(seen, key=lambda f: f.id)],
        "unseen": [heldout(f) for f in facts if f.split == "unseen"],
        "practice": [_question(t, f) for f in train for t in PRACTICE_TEMPLATES],
    }


def _paragraphs(doc: str) -> Iterable[str]:
    """Prose paragraphs of a module docstring (no code, listings or headings), whitespace-joined."""
    for paragraph in doc.split("\n\n"):
        lines = paragraph.splitlines()
        text = " ".join(paragraph.split())
        if lines and not any(line[:1].isspace() for line in lines) and ">>>" not in text \
                and 8 <= len(text.split()) <= 80 and text.endswith(".") and not _LEGAL.search(text):
            yield text


def _routing_rows(facts: list[Fact], module_docs: dict[str, str], eval_examples: int,
                  seed: int) -> tuple[list[dict], list[dict]]:
    """Text -> module over the best-populated modules; trained facts' texts never land in test."""
    items: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # module -> (text, id, side)
    for f in facts:
        side = {"train": "train", "unseen": "test"}.get(f.split, "")
        items[f.module].append((f.purpose, f.id, side))
    for module, doc in module_docs.items():
        for i, text in enumerate(_paragraphs(doc)):
            items[module].append((text, f"{module}#{i}", ""))
    labels = sorted(items, key=lambda m: (-len(items[m]), m))[:ROUTING_MODULES]
    text_uses = Counter(text for m in labels for text, _, _ in items[m])
    train, test = [], []
    for module in sorted(labels):
        chosen = sorted(items[module], key=lambda item: _unit(seed, "routing", item[1]))
        for text, item_id, side in chosen[:ROUTING_PER_MODULE]:
            if text_uses[text] > 1:
                continue  # the same text under two labels has no single right answer
            side = side or ("test" if _unit(seed, "routing-split", item_id) < 0.2 else "train")
            row = {"input": ROUTING_PROMPT.format(text=text), "output": module, "id": item_id,
                   "module": module}
            (test if side == "test" else train).append(row)
    test = sorted(test, key=lambda r: _unit(seed, "routing-test", r["id"]))[:eval_examples]
    return sorted(train, key=lambda r: r["id"]), sorted(test, key=lambda r: r["id"])


def _keyword_rows(facts: list[Fact], split: str, limit: int | None = None) -> list[dict]:
    rows = [{"input": KEYWORDS_PROMPT.format(text=f.purpose), "output": f.id, "id": f.id, "module": f.module}
            for f in facts if f.split == split]
    return rows[:limit]


# --- writing, caching ----------------------------------------------------------------------------


def _write_rows(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL; return how many (for the manifest's counts)."""
    rows = list(rows)
    write_jsonl(path, rows)
    return len(rows)


def _content_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _python_tag() -> str:
    return f"{sys.implementation.name}-{platform.python_version()}-{sys.platform}"


def _write_corpus(corpus_dir: Path, module_docs: dict[str, str], entries: list[Entry]) -> dict[str, str]:
    """corpus/<module>.txt for every module with any documentation; returns module -> text."""
    by_module: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_module[e.module].append(e)
    texts = {}
    for module in sorted(module_docs):
        if module_docs[module] or by_module[module]:
            texts[module] = render_module(module, module_docs[module], by_module[module])
            (corpus_dir / f"{module}.txt").write_text(texts[module], encoding="utf-8", newline="\n")
    return texts


def build_pydocs(out_dir: Path, facts: int = 600, eval_examples: int = 200, seed: int = 0,
                 progress: bool = True, modules: Sequence[str] | None = None) -> PydocsPaths:
    """Build the data set into `out_dir` (new or empty); the same inputs give byte-identical files.

    Args:
        facts: facts in the train split (the shortest purposes; see `_assign_splits`).
        eval_examples: most rows in each of seen, unseen, routing_test and keywords_test.
        seed: decides held-out facts, eval samples and held-out phrasings.
        modules: document only these modules (default: `stdlib_modules()`); for quick tests.
    """
    if facts < 1 or eval_examples < 1:
        raise UserError(f"facts and eval_examples must be at least 1 (got {facts} and {eval_examples})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; pydocs builds into a new or empty folder")
    paths = PydocsPaths.at(out_dir)
    paths.corpus_dir.mkdir(parents=True)
    names = sorted(set(modules)) if modules is not None else stdlib_modules()

    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task("pydocs", total=len(names) + 1)
        module_docs, entries = read_library(names, modules is not None, bar, task)
        bar.update(task, description="pydocs: writing")
        corpus = _write_corpus(paths.corpus_dir, module_docs, entries)
        all_facts = _assign_splits(_facts(entries), facts, eval_examples, seed)
        train_facts = sum(f.split == "train" for f in all_facts)
        if train_facts < facts:
            raise UserError(f"only {train_facts} of the {len(all_facts)} usable pydocs facts can be train "
                            f"facts next to {eval_examples} held-out ones; ask for fewer (got facts={facts})")
        normalised = {module: " ".join(text.split()) for module, text in corpus.items()}
        for f in all_facts:  # the RAG store must hold every answer, word for word
            if " ".join(f.purpose.split()) not in normalised[f.module]:
                raise AssertionError(f"purpose of {f.id} is missing from corpus/{f.module}.txt")
        _write_rows(paths.facts, (asdict(f) for f in all_facts))
        qa = _qa_rows(all_facts, eval_examples, seed)
        routing_train, routing_test = _routing_rows(all_facts, module_docs, eval_examples, seed)
        counts = {
            "modules": len(corpus), "corpus_chars": sum(map(len, corpus.values())),
            "facts": len(all_facts), "train_facts": train_facts,
            "unseen_facts": sum(f.split == "unseen" for f in all_facts),
            "train": _write_rows(paths.train, qa["train"]),
            "seen": _write_rows(paths.seen, qa["seen"]),
            "unseen": _write_rows(paths.unseen, qa["unseen"]),
            "practice": _write_rows(paths.practice, qa["practice"]),
            "routing_train": _write_rows(paths.routing_train, routing_train),
            "routing_test": _write_rows(paths.routing_test, routing_test),
            "keywords_train": _write_rows(paths.keywords_train, _keyword_rows(all_facts, "train")),
            "keywords_test": _write_rows(paths.keywords_test,
                                          _keyword_rows(all_facts, "unseen", eval_examples)),
        }
        manifest = {"build_version": BUILD_VERSION, "python": _python_tag(),
                    "parameters": _parameters(facts, eval_examples, seed, modules),
                    "counts": counts, "modules": sorted(corpus), "content_sha256": _content_hash(out_dir)}
        write_json(paths.manifest, manifest)
        bar.advance(task)
    return paths


def _parameters(facts: int, eval_examples: int, seed: int, modules: Sequence[str] | None) -> dict:
    return {"facts": facts, "eval_examples": eval_examples, "seed": seed,
            "modules": sorted(set(modules)) if modules is not None else None}


def _is_current(root: Path, parameters: dict) -> bool:
    """True when `root` holds a complete, untouched build of this version for these parameters."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (manifest.get("build_version") == BUILD_VERSION and manifest.get("python") == _python_tag()
            and manifest.get("parameters") == parameters
            and manifest.get("content_sha256") == _content_hash(root))


def load_or_build(cache_dir: Path | None = None, facts: int = 600, eval_examples: int = 200,
                  seed: int = 0, rebuild: bool = False, progress: bool = True,
                  modules: Sequence[str] | None = None) -> PydocsPaths:
    """The cached build for these parameters, built first if missing, stale or `rebuild` is set.

    The cache lives in `cache_dir` (default: `default_cache_dir()`) under
    `pydocs/<python>-f<facts>-e<eval_examples>-s<seed>[-m<modules hash>]`. A build goes into a
    temporary folder that is renamed into place, so readers never see a half-written data set.
    """
    parameters = _parameters(facts, eval_examples, seed, modules)
    name = f"{_python_tag()}-f{facts}-e{eval_examples}-s{seed}"
    if modules is not None:
        name += "-m" + hashlib.sha256(json.dumps(parameters["modules"]).encode()).hexdigest()[:8]
    final = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "pydocs" / name
    if not rebuild and _is_current(final, parameters):
        return PydocsPaths.at(final)
    build_into_place(final, lambda tmp: build_pydocs(tmp, facts, eval_examples, seed, progress, modules),
                     lambda folder: _is_current(folder, parameters))
    return PydocsPaths.at(final)


if __name__ == "__main__":  # python -m specialize.examples.pydocs [OUT_DIR]: build there, or into the cache
    built = build_pydocs(Path(sys.argv[1])) if len(sys.argv) > 1 else load_or_build()
    print(json.dumps(json.loads(built.manifest.read_text())["counts"], indent=2))
    print(f"written to {built.root}")
