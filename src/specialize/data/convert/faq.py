"""FAQ and documentation pages (HTML, Markdown, plain text) → question/answer pairs.

Every reader turns its file into one flat stream of `Item`s in reading order: headings,
text blocks, "pseudo" questions (a bold question or a `Q:` line opening a paragraph) and
ready pairs found by structure (`<details>`, `<dt>/<dd>`, accordions, schema.org microdata).
`pairs_from_items` then cuts the stream: a question's answer is everything after it up to the
next question or the next heading of the same or a higher level, so an answer never runs
into the next question or the next section.

Which headings are questions:
- text that reads as a question: ends with "?", starts with `Q:`/`Question:`, or opens with an
  interrogative plus verb ("How do I …", "Can I …");
- inside an FAQ scope (the page title / h1 / file name says FAQ, or a heading such as
  "Frequently asked questions" opens a section), headings at level 2 or deeper that hold
  no further questions; a heading that goes straight into sub-questions or accordion items
  is a category (details in `_question_headings`).
A question-like heading over further questions ("How can we help?") is a page title.

Documentation that is not an FAQ (`--kind docs`) goes through the same reader, so it yields
pairs only from explicit questions; turning plain prose into Q&A needs `--generator` (see llm.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# "FAQ", "Frequently asked questions", "Q&A", also in a few other languages' words for questions.
FAQ_RE = re.compile(r"\b(faqs?|f\.a\.q\.?|frequently[\s-]+asked|questions|q\s*&\s*a|q\s+and\s+a|preguntas|perguntas|"
                    r"domande|fragen|vragen|pytania)\b", re.I)
QUESTION_MARKS = ("?", "？", "؟", "\u037e")  # Latin, full-width, Arabic, Greek
Q_PREFIX = re.compile(r"^\s*(?:Q|Ques|Question)\s*\d{0,3}\s*[:.)]\s*(?=\S)", re.I)
A_PREFIX = re.compile(r"^\s*(?:A|Ans|Answer)\s*\d{0,3}\s*[:.)]\s+", re.I)
A_COLON_INLINE = re.compile(r"\s(?:A|Answer)\s*:\s+")
_NUMBERING = re.compile(r"^\s*(?:\d{1,3}|[ivx]{1,4})\s*[.)]\s+", re.I)
_INTERROGATIVE = re.compile(
    r"^(?:(?:how|what|why|when|where|who|whom|whose|which)(?:'s|\s+(?:do|does|did|is|are|was|were|can|could|"
    r"should|would|will|shall|may|might|must|has|have|to))|(?:can|could|do|does|did|is|are|should|will|would|"
    r"may|shall|has|have|am|must)\s+(?:i|we|you|my|our|your|it|they|there|this|that|these|those|the|a|an|he|"
    r"she|one|someone|anyone|anybody|somebody))\b", re.I)
# Headings that close a section but are never questions, even inside an FAQ scope: page
# furniture (related articles, comments, widgets) and contact/newsletter sections.
_NOT_QUESTION = re.compile(
    r"^((related|recent|latest|popular) (articles|posts|questions|topics|pages|news|comments|courses)|related|"
    r"recently viewed( articles)?|articles in this section|table of contents|contents|on this page|"
    r"in this (article|section|page)|navigation|search|comments?|\d+ (comments?|thoughts?|responses?)\b.*|"
    r"leave a (reply|comment)|categories|tags|see also|archives|footnotes|references|menu|resources|"
    r"(quick|useful) links|about us|share\b.*|contact\b.*|get in touch\b.*|subscribe\b.*|sign up\b.*|"
    r"newsletters?\b.*|follow us\b.*)$", re.I)
# Questions that are page furniture ("Was this article helpful?"), dropped with a reason.
_BOILERPLATE_QUESTION = re.compile(
    r"^(was this (article|page|answer|post|information)( \w+)? (helpful|useful)|did (this|we) (answer|help|solve)|"
    r"(still )?(have|got) (more|other|any|any other|further) questions|still have questions|still need help|"
    r"need (more|further) help|can'?t find (what|an answer|the answer)|didn'?t find (what|an answer|your answer)|"
    r"(any|more) questions)\b", re.I)
_BOILERPLATE_BLOCK = re.compile(
    r"^(have more questions\?|still have questions\?|was this (article|page|answer) helpful\?|"
    r"\d+ out of \d+ found this helpful|(back|return) to top)", re.I)


@dataclass
class Item:
    """One piece of a page in reading order."""

    kind: str  # heading | block | pseudo | pair | category
    text: str  # heading text, block text, or question text
    level: int = 0  # heading level; pseudo questions and pairs sit below every heading (7)
    answer: str = ""  # pair: its answer; pseudo: the rest of its paragraph
    strong: bool = True  # the markup alone makes it a question; weak ones count only in an FAQ scope
    line: int | None = None
    anchor: str | None = None
    via: str = "heading"  # how the question was found, recorded in the source


@dataclass
class Pair:
    """A question found on a page, its answer text and where it was found."""

    question: str
    answer: str
    line: int | None
    anchor: str | None
    via: str


def clean_question(text: str) -> str:
    """Question text without `Q:` prefixes, numbering, permalink marks and extra spaces."""
    text = " ".join(text.split())
    # Markdown left unrendered inside raw HTML blocks: "### How to set JAVA\_HOME?"
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", r"\1", re.sub(r"^#{1,6}\s+", "", text))
    text = Q_PREFIX.sub("", text, count=1)
    text = _NUMBERING.sub("", text, count=1)
    return re.sub(r"\s*[¶#§]+$", "", text).strip()


def looks_like_question(text: str) -> bool:
    """True for text that reads as a question on its own (no page context needed)."""
    cleaned = clean_question(text)
    if not cleaned or len(cleaned) > 300:
        return False
    if cleaned.endswith(QUESTION_MARKS) or Q_PREFIX.match(text):
        return True
    # "How to fix it:" is a label that introduces the text below, not a question.
    return bool(_INTERROGATIVE.match(cleaned)) and not cleaned.endswith(":")


def is_faq_title(text: str) -> bool:
    """True when a title, heading or file name announces an FAQ."""
    return bool(FAQ_RE.search(text.replace("_", " ").replace("-", " ")))


def split_q_prefixed(text: str) -> tuple[str, str]:
    """`Q: question A: answer` in one block → (question, rest of the block)."""
    first, _, rest = text.partition("\n")
    inline = A_COLON_INLINE.search(first)
    if inline:
        return first[:inline.start()], (first[inline.end():] + "\n" + rest).strip()
    return first, rest.strip()


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
        if not in_scope[i] or item.level < 2 or open_questions or _NOT_QUESTION.match(item.text.strip().rstrip(":")):
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
    for i in sorted(questions, reverse=True):
        section = _section(items, i)
        if section.strong or section.weak_pairs >= 2 or questions & set(section.subheadings):
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
            furniture = item.kind == "heading" and _NOT_QUESTION.match(item.text.strip().rstrip(":"))
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
        elif current is not None and not _BOILERPLATE_BLOCK.match(item.text):
            parts.append(item.text)
    close()
    return pairs, dropped


def _finish(item: Item, parts: list[str], q_prefixed: bool, pairs: list[Pair], dropped: Counter) -> None:
    question = clean_question(item.text)
    answer = "\n\n".join(p.strip() for p in parts if p.strip())
    answer = A_PREFIX.sub("", answer, count=1) if (q_prefixed or re.match(r"\s*(A|Answer)\s*:", answer)) else answer
    if not question:
        dropped["empty question"] += 1
    elif _BOILERPLATE_QUESTION.match(question):
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
    # Imported here because the readers build on this module's Item and Pair.
    from specialize.data.convert import faq_html, faq_text

    suffix = path.suffix.lower()
    name_says_faq = is_faq_title(path.stem)
    extra: list[Pair] = []
    if suffix in (".html", ".htm", ".xhtml") or (suffix not in faq_text.MARKDOWN and faq_html.looks_like_html(text)):
        items, page_is_faq, extra = faq_html.read_html(text, name_says_faq=name_says_faq)
    elif suffix in faq_text.MARKDOWN:
        items, page_is_faq = faq_text.read_markdown(text, name_says_faq=name_says_faq)
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


def document_text(path: Path, text: str) -> str:
    """The readable text of a whole page (boilerplate removed), for the LLM generator."""
    from specialize.data.convert import faq_html, faq_text

    suffix = path.suffix.lower()
    if suffix in (".html", ".htm", ".xhtml") or (suffix not in faq_text.MARKDOWN and faq_html.looks_like_html(text)):
        return faq_html.page_text(text)
    if suffix in faq_text.MARKDOWN:
        return faq_text.markdown_text(text)
    return text.strip()
