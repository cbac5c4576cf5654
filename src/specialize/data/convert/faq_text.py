"""Markdown and plain-text pages → the FAQ item stream (see faq.py).

Markdown is rendered to HTML with markdown-it (raw HTML such as `<details>` kept) and read by
the HTML reader, so `## Question?` headings, `**Q:**` paragraphs and accordions all work the
same way. Each rendered block carries its Markdown source line, and headings get GitHub's
anchor slugs, so a pair's source points at `file.md#how-do-i-x` and its line.

Plain text has no markup, so questions are lines: `Q:` / `Question:` lines (answer after an
optional `A:`), or a paragraph whose first line is a question ending in "?". Underlined
(setext) titles are headings.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt

from specialize.data.convert.faq_html import read_html
from specialize.data.convert.questions import A_PREFIX, Q_PREFIX, QUESTION_MARKS, Item, clean_question
from specialize.data.htmltext import clean_page, render
from specialize.data.htmltree import MAX_ELEMENTS, parse_html
from specialize.errors import UserError

MARKDOWN = {".md", ".markdown", ".mdown", ".mkd"}
_KEEP_LINE = re.compile(r"^(\s*([-*•+]|\d{1,3}[.)])\s|\s{4}|\t|\s*\|)")
_UNDERLINE = re.compile(r"^\s*(={3,}|-{3,}|~{3,}|\^{3,}|\*{3,})\s*$")


def markdown_to_html(text: str, where: str | None = None) -> str:
    """Render Markdown to HTML whose blocks carry `data-source-line` and whose headings carry ids.

    Raises:
        UserError: the text has more lines than a page may have elements (`htmltree.MAX_ELEMENTS`):
            markdown-it would spend minutes and gigabytes on a million headings before the
            element limit could be checked.
    """
    lines = text.count("\n") + 1
    if lines > MAX_ELEMENTS:
        raise UserError(f"{lines:,} lines, over the {MAX_ELEMENTS:,}-line limit for one Markdown page "
                        "(generated or broken?); split it, or leave it out", path=where)
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    tokens = md.parse(text)
    slugs: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token.type == "html_block" and token.map:
            token.content = _mark_raw_lines(token.content, token.map[0] + 1)
        elif token.map and token.nesting >= 0 and token.type != "inline":
            token.attrSet("data-source-line", str(token.map[0] + 1))
        if token.type == "heading_open" and i + 1 < len(tokens):
            words = "".join(c.content for c in tokens[i + 1].children or [] if c.type in ("text", "code_inline"))
            slug = re.sub(r"[^\w\- ]", "", words.strip().lower()).replace(" ", "-")
            count = slugs.get(slug, 0)
            slugs[slug] = count + 1
            token.attrSet("id", slug if count == 0 else f"{slug}-{count}")
    return md.renderer.render(tokens, md.options, {})


def _mark_raw_lines(html: str, first_line: int) -> str:
    """Give each start tag of a raw HTML block (`<details>`, `<summary>`) its Markdown line."""
    def mark(match: re.Match) -> str:
        return f'{match.group(0)} data-source-line="{first_line + html.count(chr(10), 0, match.start())}"'
    return re.sub(r"<[a-zA-Z][\w-]*", mark, html)


def read_markdown(text: str, *, name_says_faq: bool = False, where: str | None = None) -> tuple[list[Item], bool]:
    """FAQ items of a Markdown page, and whether the page is an FAQ (first heading or file name)."""
    html = markdown_to_html(text, where)
    items, page_is_faq, _ = read_html(html, name_says_faq=name_says_faq, parser_lines=False, where=where)
    return items, page_is_faq


def markdown_text(text: str, where: str | None = None) -> str:
    """Readable text of a Markdown page."""
    return render(clean_page(parse_html(markdown_to_html(text, where), parser_lines=False, where=where)))


def read_plain(text: str) -> list[Item]:
    """FAQ items of a plain-text file: `Q:`/`A:` lines, question lines and underlined titles."""
    items: list[Item] = []
    for start, lines in _paragraphs(text):
        if len(lines) >= 2 and _UNDERLINE.match(lines[1]) and lines[0].strip():
            level = 1 if lines[1].strip().startswith("=") else 2
            items.append(Item("heading", lines[0].strip(), level, line=start))
            lines, start = lines[2:], start + 2
            if not lines:
                continue
        q_lines = [i for i, line in enumerate(lines) if Q_PREFIX.match(line)]
        if not q_lines and _is_question_line(lines[0]):
            q_lines = [0]
        head = lines[:q_lines[0]] if q_lines else lines
        if head:
            items.append(Item("block", _unwrap(head)))
        for n, q in enumerate(q_lines):
            end = q_lines[n + 1] if n + 1 < len(q_lines) else len(lines)
            body = lines[q:end]
            # A Q: question may wrap onto more lines when an A: line marks where its answer starts.
            split = 1
            if Q_PREFIX.match(body[0]):
                split = next((k for k in range(1, len(body)) if A_PREFIX.match(body[k])), 1)
            question = " ".join(line.strip() for line in body[:split])
            answer = _unwrap(body[split:])
            via = "q-prefix" if Q_PREFIX.match(question) else "text"
            items.append(Item("pseudo", question, 7, answer, line=start + q, via=via))
    return items


def _unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines into one, keeping list items and indented (code) lines apart."""
    out: list[str] = []
    for line in lines:
        if out and not _KEEP_LINE.match(line):
            out[-1] = out[-1].rstrip() + " " + line.strip()
        else:
            out.append(line.rstrip())
    return "\n".join(out).strip()


def _is_question_line(line: str) -> bool:
    stripped = line.strip()
    return stripped.endswith(QUESTION_MARKS) and 0 < len(clean_question(stripped)) <= 200


def _paragraphs(text: str) -> list[tuple[int, list[str]]]:
    """Blank-line separated paragraphs as (first line number, lines), right-stripped."""
    paragraphs: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                start = number
            current.append(line.rstrip())
        elif current:
            paragraphs.append((start, current))
            current = []
    if current:
        paragraphs.append((start, current))
    return paragraphs
