"""What reads as a question, and the items every page reader (HTML, Markdown, plain text) emits.

The readers (faq_html.py, faq_text.py) turn a page into a stream of `Item`s; faq.py cuts that
stream into `Pair`s. Both sides share these rules, so they live apart from either:
- `looks_like_question`: text that is a question on its own: ends with "?" (or a full-width,
  Arabic or Greek question mark), starts with `Q:`/`Question:`, or opens with an interrogative
  plus a verb ("How do I …", "Can I …"), but not a label ending in ":" ("How to fix it:");
- `clean_question`: the question without `Q:` prefixes, numbering and permalink marks;
- `is_faq_title`: a title, heading or file name that announces an FAQ (in a few languages);
- what never is one: page furniture headings (`NOT_QUESTION`: "Related articles", "Contact us")
  and boilerplate questions (`BOILERPLATE_QUESTION`: "Was this article helpful?").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "FAQ", "Frequently asked questions", "Q&A", also in a few other languages' words for questions.
FAQ_RE = re.compile(r"\b(faqs?|f\.a\.q\.?|frequently[\s-]+asked|questions|q\s*&\s*a|q\s+and\s+a|preguntas|perguntas|"
                    r"domande|fragen|vragen|pytania)\b", re.I)
QUESTION_MARKS = ("?", "？", "؟", "\u037e")  # Latin, full-width, Arabic, Greek
Q_PREFIX = re.compile(r"^\s*(?:Q|Ques|Question)\s*\d{0,3}\s*[:.)]\s*(?=\S)", re.I)
A_PREFIX = re.compile(r"^\s*(?:A|Ans|Answer)\s*\d{0,3}\s*[:.)]\s+", re.I)
A_COLON_INLINE = re.compile(r"\s(?:A|Answer)\s*:\s+")
_NUMBERING = re.compile(r"^\s*(?:\d{1,3}(?:\.\d{1,3})*|[ivx]{1,4})\s*[.)]\s+", re.I)  # "3.", "3.1.", "iv)"
_INTERROGATIVE = re.compile(
    r"^(?:(?:how|what|why|when|where|who|whom|whose|which)(?:'s|\s+(?:do|does|did|is|are|was|were|can|could|"
    r"should|would|will|shall|may|might|must|has|have|to))|(?:can|could|do|does|did|is|are|should|will|would|"
    r"may|shall|has|have|am|must)\s+(?:i|we|you|my|our|your|it|they|there|this|that|these|those|the|a|an|he|"
    r"she|one|someone|anyone|anybody|somebody))\b", re.I)

# Headings that close a section but are never questions, even inside an FAQ scope: page
# furniture (related articles, comments, widgets) and contact/newsletter sections.
NOT_QUESTION = re.compile(
    r"^((related|recent|latest|popular) (articles|posts|questions|topics|pages|news|comments|courses)|related|"
    r"recently viewed( articles)?|articles in this section|table of contents|contents|on this page|"
    r"in this (article|section|page)|navigation|search|comments?|\d+ (comments?|thoughts?|responses?)\b.*|"
    r"leave a (reply|comment)|categories|tags|see also|archives|footnotes|references|menu|resources|"
    r"(quick|useful) links|about us|share\b.*|contact\b.*|get in touch\b.*|subscribe\b.*|sign up\b.*|"
    r"newsletters?\b.*|follow us\b.*)$", re.I)
# Questions that are page furniture ("Was this article helpful?"), dropped with a reason.
BOILERPLATE_QUESTION = re.compile(
    r"^(was this (article|page|answer|post|information)( \w+)? (helpful|useful)|did (this|we) (answer|help|solve)|"
    r"(still )?(have|got) (more|other|any|any other|further) questions|still have questions|still need help|"
    r"need (more|further) help|can'?t find (what|an answer|the answer)|didn'?t find (what|an answer|your answer)|"
    r"(any|more) questions)\b", re.I)
BOILERPLATE_BLOCK = re.compile(
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
