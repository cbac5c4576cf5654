"""Retrieval for RAG: chunk documents, index them with BM25, and build the one RAG prompt.

    retriever = Retriever.build("docs/", chunk_words=200, overlap_words=50)
    passages = retriever.search("How do I reset my password?", k=3)
    prompt = rag_prompt("How do I reset my password?", passages)
    retriever.save("runs/x/index"); retriever = load_retriever("runs/x/index")

Documents are a folder (`.txt`, `.md`, `.rst`, `.html`/`.htm`, searched recursively, hidden
files skipped) or a JSONL file of passages (`text`, optional `id`, `title`, `source`). Each
document is cut into chunks of `chunk_words` white-space words, neighbours sharing
`overlap_words`, so an answer that straddles a boundary is whole in one chunk. A chunk keeps its
original text (line breaks, code indentation); a title (JSONL `title`, HTML `<title>`) heads
every chunk of its document, because the title often names what the chunk is about. HTML is
read by `data.htmltext.html_to_text`, the reader `convert` uses: navigation, page header and
footer, sidebars and scripts are left out. `chunk_text` is also the chunker of the LLM converter.
`Passage.source` is the file's path relative to the folder (JSONL: `source`, else `id`, else
`file:line`), with `#n` added when the document was cut into several chunks.

BM25 is `bm25s` (Lucene variant, k1=1.5, b=0.75) over its default tokenizer (lower-cased
words of 2+ letters or digits, English stop words removed) plus the Porter stemmer from nltk
(already installed with rouge-score), so "refund" finds "Refunds". Ties are broken by
passage order so results are reproducible, and passages sharing no word with the query
(score 0) are never returned. `DenseRetriever` is the optional alternative: a local
sentence-transformers model folder, cosine similarity.

Saved indexes hold only JSON, JSONL and numpy arrays read with `allow_pickle=False`, so loading
an index from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from specialize.data.htmltext import html_to_text
from specialize.data.io import jsonl_lines, read_text
from specialize.errors import UserError
from specialize.files import write_json, write_jsonl

# The RAG prompt: what every RAG system is asked at eval time, and what fine-tuning with
# retrieved context (rag_docs) trains on, so that both see the same shape. It is the user's
# question; the run's own template (Q&A, Alpaca, chat) then wraps it like any other question.
RAG_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
PASSAGE_TEMPLATE = "[{number}] {text}"
DOC_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm")
INDEX_FORMAT = 1
# recorded in the index: query words must be tokenized exactly as the passages were
TOKENIZER = "bm25s.tokenize(lower, stopwords=en) + nltk porter"


@dataclass(frozen=True)
class Passage:
    """A chunk of a document: its text, where it came from ("guide/setup.md#2"), its score."""

    text: str
    source: str
    score: float = 0.0


def format_passages(passages: list[Passage] | list[str]) -> str:
    """Passages numbered one per line (PASSAGE_TEMPLATE): a RAG prompt's context, and a search_docs result."""
    texts = [p.text if isinstance(p, Passage) else p for p in passages]
    return "\n".join(PASSAGE_TEMPLATE.format(number=i, text=t) for i, t in enumerate(texts, 1))


def rag_prompt(question: str, passages: list[Passage] | list[str]) -> str:
    """The question with numbered passages in front (RAG_TEMPLATE); the question alone if none."""
    if not passages:
        return question
    return RAG_TEMPLATE.format(context=format_passages(passages), question=question)


def chunk_text(text: str, chunk_words: int, overlap_words: int) -> list[str]:
    """Windows of `chunk_words` words, each starting `chunk_words - overlap_words` after the last.

    The last window ends at the last word (it may be shorter). Chunks are slices of the original
    text, so white space inside a chunk is kept as written.
    """
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    step = chunk_words - overlap_words
    chunks = []
    for start in range(0, len(spans), step):
        end = min(start + chunk_words, len(spans))
        chunks.append(text[spans[start][0]:spans[end - 1][1]])
        if end == len(spans):
            break
    return chunks


def _documents(docs_path: Path) -> list[tuple[str, str, str]]:
    """(source, title, text) of every document under docs_path."""
    if docs_path.suffix == ".jsonl" and docs_path.is_file():
        docs = []
        for line_no, line in jsonl_lines(read_text(docs_path)):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"not valid JSON ({e.msg})", path=docs_path, line=line_no) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError("each passage needs a string 'text'", path=docs_path,
                                line=line_no, field="text")
            source = obj.get("source") or obj.get("id") or f"{docs_path.name}:{line_no}"
            docs.append((str(source), str(obj.get("title") or ""), obj["text"]))
        return docs
    if docs_path.is_file():
        files, root = [docs_path], docs_path.parent
    elif docs_path.is_dir():
        root = docs_path
        files = sorted(p for p in docs_path.rglob("*") if p.is_file()
                       and p.suffix.lower() in DOC_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    else:
        raise UserError("documents not found (give a folder or a JSONL file of passages)",
                        path=docs_path)
    docs = []
    for path in files:
        if path.suffix.lower() not in DOC_SUFFIXES:
            raise UserError(f"unsupported document type; use a folder, .jsonl or one of "
                            f"{', '.join(DOC_SUFFIXES)}", path=path)
        title, text = "", read_text(path, allow_empty=True)
        if path.suffix.lower() in (".html", ".htm"):
            title, text = html_to_text(text, path)
        docs.append((path.relative_to(root).as_posix(), title, text))
    return docs


def load_passages(docs_path: str | Path, chunk_words: int = 200,
                  overlap_words: int = 50) -> list[Passage]:
    """All chunks of all documents, in document order (see the module docstring)."""
    if chunk_words < 1:
        raise UserError("must be at least 1", field="chunk_words")
    if not 0 <= overlap_words < chunk_words:
        raise UserError("must be at least 0 and less than chunk_words", field="overlap_words")
    passages = []
    for source, title, text in _documents(Path(docs_path)):
        chunks = chunk_text(text, chunk_words, overlap_words)
        for n, chunk in enumerate(chunks, start=1):
            # "#n" numbers the chunks of a document cut in several
            passages.append(Passage(f"{title}\n{chunk}" if title else chunk,
                                    f"{source}#{n}" if len(chunks) > 1 else source))
    if not passages:
        raise UserError(f"no text to index (documents are {', '.join(DOC_SUFFIXES)} files "
                        "or a .jsonl of passages)", path=docs_path)
    return passages


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    stem = lru_cache(maxsize=200_000)(PorterStemmer().stem)  # corpora repeat words a lot
    return lambda words: [stem(w) for w in words]


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords="en", stemmer=_stemmer(), return_ids=False,
                          show_progress=False)


class _Index:
    """What both retrievers share: passages, top-k selection, saving passages and settings."""

    kind = ""

    def __init__(self, passages: list[Passage], settings: dict):
        self.passages = passages
        self.settings = settings

    def _scores(self, queries: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def _top_k(self, scores: np.ndarray, k: int, positive_only: bool) -> list[Passage]:
        # sort by score, then by passage order: stable results across runs and machines
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        return [Passage(self.passages[i].text, self.passages[i].source, float(scores[i]))
                for i in order if scores[i] > 0 or not positive_only]

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The k best passages for one query, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """The k best passages for each query."""
        if k < 1:
            raise UserError("must be at least 1", field="top_k")
        positive_only = self.kind == "bm25"
        return [self._top_k(s, k, positive_only) for s in self._scores(queries)]

    def _save_common(self, folder: Path) -> None:
        write_jsonl(folder / "passages.jsonl", ({"text": p.text, "source": p.source} for p in self.passages))
        meta = {"format": INDEX_FORMAT, "kind": self.kind, "num_passages": len(self.passages),
                **self.settings}
        write_json(folder / "retriever.json", meta)

    @staticmethod
    def _load_passages(folder: Path) -> list[Passage]:
        with (folder / "passages.jsonl").open(encoding="utf-8") as f:
            return [Passage(**json.loads(line)) for line in f if line.strip()]


class Retriever(_Index):
    """BM25 over chunked documents (bm25s)."""

    kind = "bm25"

    def __init__(self, passages: list[Passage], bm25, settings: dict):
        super().__init__(passages, settings)
        self._bm25 = bm25

    @classmethod
    def build(cls, docs_path: str | Path, chunk_words: int = 200,
              overlap_words: int = 50) -> Retriever:
        """Chunk the documents at docs_path and index them."""
        import bm25s

        passages = load_passages(docs_path, chunk_words, overlap_words)
        bm25 = bm25s.BM25()
        bm25.index(_tokenize([p.text for p in passages]), show_progress=False)
        settings = {"docs_path": str(docs_path), "chunk_words": chunk_words,
                    "overlap_words": overlap_words, "tokenizer": TOKENIZER}
        return cls(passages, bm25, settings)

    def _scores(self, queries: list[str]) -> list[np.ndarray]:
        vocab = self._bm25.vocab_dict
        scores = []
        for tokens in _tokenize(queries):
            known = [t for t in tokens if t and t in vocab]
            scores.append(self._bm25.get_scores(known) if known
                          else np.zeros(len(self.passages), dtype=np.float32))
        return scores

    def save(self, folder: str | Path) -> None:
        """Write retriever.json, passages.jsonl and bm25/ (bm25s's JSON + .npy files)."""
        folder = Path(folder)
        self._save_common(folder)
        self._bm25.save(folder / "bm25", allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, folder: str | Path) -> Retriever:
        """An index written by `save`."""
        import bm25s

        folder = Path(folder)
        meta = _read_meta(folder, cls.kind)
        bm25 = bm25s.BM25.load(folder / "bm25", allow_pickle=False, load_corpus=False,
                               show_progress=False)
        passages = cls._load_passages(folder)
        if len(passages) != bm25.scores["num_docs"]:
            raise UserError("passages.jsonl does not match the index; rebuild it", path=folder)
        if meta.get("tokenizer") != TOKENIZER:
            raise UserError(f"index was built with tokenizer {meta.get('tokenizer')!r}, this version "
                            f"uses {TOKENIZER!r}; rebuild it", path=folder)
        return cls(passages, bm25, {k: meta[k] for k in ("docs_path", "chunk_words", "overlap_words",
                                                           "tokenizer")})


class DenseRetriever(_Index):
    """Cosine similarity of sentence-transformers embeddings (a local model folder, no download)."""

    kind = "dense"

    def __init__(self, passages: list[Passage], embeddings: np.ndarray, model, model_path: str,
                 settings: dict):
        super().__init__(passages, {**settings, "model_path": model_path})
        self._embeddings = embeddings  # (num_passages, dim), unit length
        self._model = model

    @classmethod
    def build(cls, docs_path: str | Path, model_path: str | Path, chunk_words: int = 200,
              overlap_words: int = 50) -> DenseRetriever:
        """Chunk the documents and embed every chunk with the model at model_path."""
        model = _sentence_transformer(str(model_path))  # fail before the slow part
        passages = load_passages(docs_path, chunk_words, overlap_words)
        embeddings = model.encode([p.text for p in passages], normalize_embeddings=True,
                                  convert_to_numpy=True)
        settings = {"docs_path": str(docs_path), "chunk_words": chunk_words,
                    "overlap_words": overlap_words}
        return cls(passages, np.asarray(embeddings, dtype=np.float32), model, str(model_path),
                   settings)

    def _scores(self, queries: list[str]) -> list[np.ndarray]:
        q = self._model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
        return list(np.asarray(q, dtype=np.float32) @ self._embeddings.T)  # (queries, passages)

    def save(self, folder: str | Path) -> None:
        """Write retriever.json, passages.jsonl and embeddings.npy."""
        folder = Path(folder)
        self._save_common(folder)
        np.save(folder / "embeddings.npy", self._embeddings, allow_pickle=False)

    @classmethod
    def load(cls, folder: str | Path) -> DenseRetriever:
        """An index written by `save` (the model folder must still exist)."""
        folder = Path(folder)
        meta = _read_meta(folder, cls.kind)
        embeddings = np.load(folder / "embeddings.npy", allow_pickle=False)
        settings = {k: meta[k] for k in ("docs_path", "chunk_words", "overlap_words")}
        model = _sentence_transformer(meta["model_path"])
        return cls(cls._load_passages(folder), embeddings, model, meta["model_path"], settings)


def _sentence_transformer(model_path: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("dense retrieval needs sentence-transformers "
                        "(pip install sentence-transformers); BM25 needs nothing extra") from None
    if not Path(model_path).is_dir():
        raise UserError("dense retrieval takes a local sentence-transformers model folder",
                        path=model_path)
    return SentenceTransformer(model_path)


def _read_meta(folder: Path, kind: str | None = None) -> dict:
    path = folder / "retriever.json"
    if not path.is_file():
        raise UserError("not a saved retriever index (no retriever.json)", path=folder)
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT or (kind and meta.get("kind") != kind):
        raise UserError(f"index format/kind {meta.get('format')}/{meta.get('kind')} is not "
                        f"{INDEX_FORMAT}/{kind or 'bm25|dense'}; rebuild it", path=path)
    return meta


def load_retriever(folder: str | Path) -> Retriever | DenseRetriever:
    """Whichever retriever was saved in folder."""
    kind = _read_meta(Path(folder)).get("kind")
    return DenseRetriever.load(folder) if kind == "dense" else Retriever.load(folder)
