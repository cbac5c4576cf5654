"""FAQ and documentation pages (HTML, Markdown, plain text) → question/answer pairs.

Every reader (faq_html.py, faq_text.py) turns its file into one flat stream of `Item`s
(questions.py) in reading order: headings, text blocks, "pseudo" questions (a bold question
or a `Q:` line opening a paragraph) and ready pairs found by structure (`<details>`,
`<dt>/<dd>`, accordions, schema.org microdata).
`pairs_from_items` then cuts the stream: a question's answer is everything after it up to the
next question or the next heading of the same or a higher level, so an answer never runs
into the next question or the next section.

Which headings are questions:
- text that reads as a question (`questions.looks_like_question`);
- inside an FAQ scope (the page title / h1 / file name says FAQ, or a heading such as
  "Frequently asked questions" opens a section), headings at level 2 or deeper that hold
  no further questions; a heading that goes straight into sub-questions or accordion items
  is a category (details in `_question_headings`).
A question-like heading over further questions ("How can we help?") is a page title, unless it
is a section heading (h2 or deeper) with its own introduction: then the introduction answers it.

Documentation that is not an FAQ (`--kind docs`) goes through the same reader, so it yields
pairs only from explicit questions; turning plain prose into Q&A needs `--generator` (see llm.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from specialize.data.convert import faq_html, faq_text
from specialize.data.convert.questions import (A_PREFIX, BOILERPLATE_BLOCK, BOILERPLATE_QUESTION, NOT_QUESTION,
                                               Q_PREFIX, Item, Pair, clean_question, is_faq_title, looks_like_question)
from specialize.data.htmltext import html_to_text

@dataclass
class _Section:
    """What lies under one heading, up to the next heading of its level or higher."""

    subheadings: list[int]  # item indexes of deeper headings
    intro: bool = False  # text before the first sub-heading or question
    strong: bool = False  # holds a question that stands on its own (or a category of them)
    weak_pairs: int = 0  # accordion items whose labels are not questions

    @property
    def leaf(self) -> bool:
        # A single unlabelled disclosure ("Show details") is part of the heading's own answer.
        return not self.subheadings and not self.strong and self.weak_pairs < 2


def _section(items: list[Item], i: int) -> _Section:
    section = _Section([])
    for j in range(i + 1, len(items)):
        item = items[j]
        if item.kind in ("heading", "category") and item.level <= items[i].level:
            break
        if item.kind == "heading":
            section.subheadings.append(j)
        elif item.kind == "category" or (item.kind in ("pseudo", "pair") and item.strong):
            section.strong = True
        elif item.kind == "pair":
            section.weak_pairs += 1
        elif item.kind == "block" and not section.subheadings and not section.strong and not section.weak_pairs:
            section.intro = True
    return section


def _question_headings(items: list[Item], page_is_faq: bool) -> tuple[set[int], list[bool]]:
    """Which headings are questions, and whether each item sits in an FAQ scope.

    In an FAQ scope a heading without "?" is a question when it is a leaf, or when it opens
    with its own text and at most half its sub-headings are questions: "Output differs from the
    command line" followed by paragraphs and "Default output" / "What is going on?" sub-sections is
    one question whose answer spans the sub-sections. A heading going straight into questions
    ("Billing" over "Can I get an invoice?") is a category.
    """
    scopes: list[int] = []  # levels of the open FAQ-section headings
    questions: set[int] = set()
    swallowed: set[int] = set()  # sub-headings inside such a multi-section answer
    in_scope: list[bool] = []
    open_questions: list[int] = []  # levels of enclosing question headings below h1
    for i, item in enumerate(items):
        if item.kind in ("heading", "category"):
            while scopes and scopes[-1] >= item.level:
                scopes.pop()
            while open_questions and open_questions[-1] >= item.level:
                open_questions.pop()
        in_scope.append(page_is_faq or bool(scopes))
        if item.kind != "heading":
            continue
        if looks_like_question(item.text):
            questions.add(i)
            if item.level >= 2:  # an h1 question is the page title; what is below it may still be a question
                open_questions.append(item.level)
            continue
        if is_faq_title(item.text):
            scopes.append(item.level)
            continue
        # Under "How do I cancel?", a heading such as "On mobile" is part of the answer.
        if not in_scope[i] or item.level < 2 or open_questions or NOT_QUESTION.match(item.text.strip().rstrip(":")):
            continue
        section = _section(items, i)
        sub_questions = sum(looks_like_question(items[j].text) for j in section.subheadings)
        if section.leaf:
            questions.add(i)
        elif section.intro and not section.strong and section.weak_pairs < 2 \
                and 2 * sub_questions <= len(section.subheadings):
            questions.add(i)
            open_questions.append(item.level)
            swallowed.update(section.subheadings)
    questions -= swallowed
    # A question-like title over further questions ("How can we help?") is a title, not a question.
    # But a section heading that asks a question, answers it in an introduction and then goes
    # into sub-questions (DocBook and other generated FAQs nest them so) keeps that question:
    # its answer is the introduction, up to the first sub-question.
    for i in sorted(questions, reverse=True):
        section = _section(items, i)
        nested = questions & set(section.subheadings)
        answered = section.intro and items[i].level >= 2 and looks_like_question(items[i].text)
        if section.strong or section.weak_pairs >= 2 or (nested and not answered):
            questions.discard(i)
    return questions, in_scope


def pairs_from_items(items: list[Item], page_is_faq: bool) -> tuple[list[Pair], Counter]:
    """Cut a page's item stream into question/answer pairs; also count what was dropped and why."""
    questions, in_scope = _question_headings(items, page_is_faq)
    pairs: list[Pair] = []
    dropped: Counter = Counter()
    current: Item | None = None
    parts: list[str] = []
    q_prefixed = False

    def close() -> None:
        nonlocal current
        if current is not None:
            _finish(current, parts, q_prefixed, pairs, dropped)
        current = None

    def open_question(item: Item, first: list[str]) -> None:
        nonlocal current, parts, q_prefixed
        close()
        current, parts, q_prefixed = item, first, bool(Q_PREFIX.match(item.text))

    for i, item in enumerate(items):
        if i in questions:
            open_question(item, [])
        elif item.kind in ("heading", "category"):
            furniture = item.kind == "heading" and NOT_QUESTION.match(item.text.strip().rstrip(":"))
            if current is not None and (item.level <= current.level or furniture):
                close()  # "Related articles" and the like end an answer at any level
            elif current is not None:
                parts.append(item.text)  # a sub-heading inside an answer stays as a line of text
        elif item.kind in ("pseudo", "pair"):
            inside_heading_answer = current is not None and current.kind == "heading"
            if item.strong or (in_scope[i] and not inside_heading_answer):
                open_question(item, [item.answer] if item.answer else [])
                if item.kind == "pair":
                    close()  # a pair's answer is complete; text after it belongs to no question
            elif current is not None:
                parts.append(f"{item.text}\n{item.answer}".strip())
        elif current is not None and not BOILERPLATE_BLOCK.match(item.text):
            parts.append(item.text)
    close()
    return pairs, dropped


def _finish(item: Item, parts: list[str], q_prefixed: bool, pairs: list[Pair], dropped: Counter) -> None:
    question = clean_question(item.text)
    answer = "\n\n".join(p.strip() for p in parts if p.strip())
    answer = A_PREFIX.sub("", answer, count=1) if (q_prefixed or re.match(r"\s*(A|Answer)\s*:", answer)) else answer
    if not question:
        dropped["empty question"] += 1
    elif BOILERPLATE_QUESTION.match(question):
        dropped["boilerplate question"] += 1
    elif not answer.strip():
        dropped["empty answer"] += 1
    else:
        pairs.append(Pair(question, answer.strip(), item.line, item.anchor, item.via))


def norm_question(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def extract_pairs(path: Path, text: str, display: str) -> tuple[list[dict], Counter]:
    """All question/answer rows of one FAQ or documentation file, with their sources.

    Args:
        path: the file (its suffix picks the reader: HTML, Markdown or plain text).
        text: its decoded content.
        display: the file name written into each row's `source.file`.
    """
    suffix = path.suffix.lower()
    name_says_faq = is_faq_title(path.stem)
    extra: list[Pair] = []
    if suffix in (".html", ".htm", ".xhtml") or (suffix not in faq_text.MARKDOWN and faq_html.looks_like_html(text)):
        items, page_is_faq, extra = faq_html.read_html(text, name_says_faq=name_says_faq, where=display)
    elif suffix in faq_text.MARKDOWN:
        items, page_is_faq = faq_text.read_markdown(text, name_says_faq=name_says_faq, where=display)
    else:
        items, page_is_faq = faq_text.read_plain(text), True
    pairs, dropped = pairs_from_items(items, page_is_faq)
    # JSON-LD FAQPage data usually repeats the visible FAQ: add only the questions not on the page.
    seen = {norm_question(p.question) for p in pairs}
    pairs += [p for p in extra if norm_question(p.question) not in seen]
    rows = []
    for pair in pairs:
        source = {"file": display, "anchor": pair.anchor, "line": pair.line, "converter": "faq", "via": pair.via}
        rows.append({"question": pair.question, "answer": pair.answer,
                     "source": {k: v for k, v in source.items() if v is not None}})
    return rows, dropped


def document_text(path: Path, text: str, display: str | None = None) -> str:
    """The readable text of a whole page (boilerplate removed), for the LLM generator."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm", ".xhtml") or (suffix not in faq_text.MARKDOWN and faq_html.looks_like_html(text)):
        return html_to_text(text, display)[1]
    if suffix in faq_text.MARKDOWN:
        return faq_text.markdown_text(text, display)
    return text.strip()
