"""`specialize convert`: FAQ pages, docs, support chats and Slack exports → training JSONL.

    from specialize.config import ConvertConfig
    from specialize.data.convert import convert
    print(convert(ConvertConfig(inputs=["site/faq.html", "chats.csv"], to=Path("data.jsonl"))))

Each output line is `{"question", "answer", "source"}` or `{"messages", "source"}`; `source`
always names the `file` and the `converter` (faq, chat, slack, llm) plus what is known of the
place: `anchor`, `line` and `via` (the markup the question was found by) for pages,
`conversation`/`line` for chats, `channel` and `thread` for Slack, `chunk` and `model` for
generated pairs.

The package, in pipeline order:
- inputs.py: expand folders, tell each input's kind (see its docstring), read text safely;
- faq.py (page → pairs) with questions.py (what reads as a question, the item stream),
  faq_html.py / faq_markup.py / faq_text.py (HTML, its FAQ markup, Markdown and plain text
  readers) on data/htmltree.py / data/htmltext.py (HTML tree, boilerplate removal, clean text,
  shared with RAG). Kind
  docs uses the same reader, so without a generator only explicit questions become pairs;
  with `generator` set every docs page goes to the LLM instead, and so does every faq page
  that holds no question;
- llm.py: chunks → OpenAI-compatible endpoint → pairs, with a resumable cache;
- chat.py: JSONL `messages` validated and passed through, or CSV transcripts;
- slack.py: answered threads of a workspace export;
- dedup.py: exact and near-duplicate removal.
The output is written atomically (`files.write_jsonl`: a temp file in the same folder, fsynced,
then renamed over `to`), so an interrupted run never leaves a complete-looking file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from specialize.config import ConvertConfig
from specialize.data.convert import chat, faq, llm, slack
from specialize.data.convert.dedup import dedup_rows
from specialize.data.convert.inputs import Input, find_inputs
from specialize.data.io import read_text
from specialize.errors import UserError
from specialize.files import write_jsonl

__all__ = ["ConvertSummary", "convert", "default_cache_path"]

GENERATOR_HINT = "documentation without question headings needs --generator URL --generator-model NAME"


@dataclass
class ConvertSummary:
    """Counts of one `convert` run."""

    output: Path
    produced: int = 0  # rows written
    pairs: int = 0  # of which question/answer rows
    conversations: int = 0  # of which `messages` rows
    dropped: dict[str, int] = field(default_factory=dict)  # reason → examples left out
    changed: dict[str, int] = field(default_factory=dict)  # what → examples kept but trimmed
    per_file: dict[str, int] = field(default_factory=dict)  # input → rows written from it
    kinds: dict[str, str] = field(default_factory=dict)  # input → how it was converted
    notes: list[str] = field(default_factory=list)

    def add_dropped(self, counts: Counter | dict[str, int]) -> None:
        """Add examples left out, by reason."""
        for reason, count in counts.items():
            if count:
                self.dropped[reason] = self.dropped.get(reason, 0) + count

    def add_changed(self, counts: Counter | dict[str, int]) -> None:
        """Add examples kept but changed, by what was changed."""
        for what, count in counts.items():
            if count:
                self.changed[what] = self.changed.get(what, 0) + count

    def lines(self) -> list[str]:
        """The summary as plain lines (no colours, fit for logs)."""
        lines = [f"wrote {self.produced} examples to {self.output} "
                 f"({self.pairs} question/answer pairs, {self.conversations} conversations)"]
        for name, count in self.per_file.items():
            lines.append(f"  {name} ({self.kinds.get(name, '?')}): {count}")
        if self.dropped:
            lines.append(f"dropped {sum(self.dropped.values())}:")
            by_count = sorted(self.dropped.items(), key=lambda x: (-x[1], x[0]))
            lines += [f"  {reason}: {count}" for reason, count in by_count]
        if self.changed:
            lines.append("changed:")
            lines += [f"  {what}: {count}" for what, count in sorted(self.changed.items())]
        lines += [f"note: {note}" for note in self.notes]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def default_cache_path(to: Path) -> Path:
    """Where generator replies are cached when `cache` is not set: next to the output, hidden.

    `data.jsonl` → `.data.generator-cache.jsonl`: hidden so that a folder holding the output can
    be given to `finetune` as training data without the cache in it.
    """
    return to.with_name(f".{to.stem}.generator-cache.jsonl")


def _check(cfg: ConvertConfig) -> None:
    if cfg.generator and not cfg.generator_model:
        raise UserError("a generator needs a model name: set generator_model", field="generator_model")
    if cfg.generator_model and not cfg.generator:
        raise UserError("generator_model is set but generator (the endpoint URL) is not", field="generator")
    if cfg.chunk_overlap >= cfg.chunk_tokens:
        raise UserError(f"must be smaller than chunk_tokens ({cfg.chunk_tokens})", field="chunk_overlap")
    if cfg.to.is_dir():
        raise UserError("the output is a folder; give a .jsonl file name", path=cfg.to)


def convert(cfg: ConvertConfig, progress: bool = True) -> ConvertSummary:
    """Convert every input of `cfg` and write `cfg.to`; return what was produced and dropped.

    Raises:
        UserError: for unreadable or malformed inputs, and when nothing at all was produced
            (no output file is written then).
    """
    _check(cfg)
    cache_path = cfg.cache or default_cache_path(cfg.to)
    inputs, links_out = find_inputs(cfg, skip={cfg.to.resolve(), cache_path.resolve()})
    summary = ConvertSummary(output=cfg.to)
    if links_out:
        shown = ", ".join(links_out[:3]) + (f" and {len(links_out) - 3} more" if len(links_out) > 3 else "")
        summary.notes.append(f"not followed: {len(links_out)} link(s) leading out of the input folder ({shown})")
    rows: dict[str, list[dict]] = {}  # input → its rows, in input order
    to_generate: list[tuple[str, str]] = []
    for item in inputs:
        summary.kinds[item.display] = item.kind
        if item.kind == "slack":
            found, dropped = slack.read_export(item.path, item.display)
            changed: Counter = Counter()
            summary.notes += [f"not followed: {item.display}: {n} file(s) linked from outside the export"
                              for n in [dropped.pop(slack.LINKED_OUT, 0)] if n]
        elif item.kind == "chat":
            text = read_text(item.path, display=item.display)
            if item.path.suffix.lower() == ".csv":
                found, dropped, changed = chat.read_csv(item.path, text, item.display, cfg)
            else:
                found, dropped, changed = chat.read_jsonl(item.path, text, item.display)
        else:
            found, dropped, changed = _read_page(item, cfg, to_generate)
        summary.add_dropped(dropped)
        summary.add_changed(changed)
        rows[item.display] = found
    if to_generate:
        generated, dropped, notes = llm.generate(to_generate, cfg, cache_path, progress)
        for row in generated:
            rows[row["source"]["file"]].append(row)
        summary.add_dropped(dropped)
        summary.notes += notes + [f"generator replies are cached in {cache_path} (delete it to generate anew)"]
    _add_notes(summary, cfg)
    kept, dropped = dedup_rows([row for found in rows.values() for row in found], cfg.near_duplicate_threshold)
    summary.add_dropped(dropped)
    kept_ids = {id(row) for row in kept}
    for origin, found in rows.items():
        summary.per_file[origin] = sum(id(row) in kept_ids for row in found)
    if not kept:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(summary.dropped.items(), key=lambda x: -x[1]))
        pages = any(kind in ("faq", "docs") for kind in summary.kinds.values())
        hint = f"; {GENERATOR_HINT}" if pages and not cfg.generator else ""
        raise UserError(f"nothing to write: no examples came out of {len(inputs)} input(s) "
                        f"({reasons or 'no content'}){hint}")
    write_jsonl(cfg.to, kept)
    summary.produced = len(kept)
    summary.conversations = sum("messages" in row for row in kept)
    summary.pairs = summary.produced - summary.conversations
    return summary


def _read_page(item: Input, cfg: ConvertConfig,
               to_generate: list[tuple[str, str]]) -> tuple[list[dict], Counter, Counter]:
    """Pairs of one FAQ/docs page, or queue it for the generator; (rows, dropped, changed)."""
    text = read_text(item.path, display=item.display)
    if item.kind == "docs" and cfg.generator:
        to_generate.append((item.display, faq.document_text(item.path, text, item.display)))
        return [], Counter(), Counter()
    found, dropped = faq.extract_pairs(item.path, text, item.display)
    if not found and cfg.generator:
        to_generate.append((item.display, faq.document_text(item.path, text, item.display)))
    elif not found:
        dropped["page without questions"] += 1
    return found, dropped, Counter()


def _add_notes(summary: ConvertSummary, cfg: ConvertConfig) -> None:
    if summary.dropped.get("page without questions") and not cfg.generator:
        summary.notes.append(f"{summary.dropped['page without questions']} page(s) had no question headings; "
                             f"{GENERATOR_HINT} to write Q&A from them")

