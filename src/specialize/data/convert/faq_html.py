"""HTML pages → the FAQ item stream (see faq.py), whatever generator made the page.

Questions that the markup marks (microdata, `<details>`, accordions, class pairs, `<dl>`) are
found first by faq_markup.py; an item whose panel holds further questions is a category, not
a question. Everything else is read in order as headings, bold-question paragraphs and text
blocks. JSON-LD `FAQPage` data is parsed as well and adds the questions the visible page lacks.
"""

from __future__ import annotations

import re

from specialize.data.convert.faq_markup import anchor_of, candidates, jsonld_pairs, resolve
from specialize.data.convert.questions import (Q_PREFIX, QUESTION_MARKS, Item, Pair, is_faq_title, looks_like_question,
                                               split_q_prefixed)
from specialize.data.htmltext import BLOCK, SKIP, clean_page, heading_text, render, render_element
from specialize.data.htmltree import HEADINGS, Node, parse_html

_QUESTION_CHARS = 400  # raw characters (white space included) of a paragraph that may be a question
_PSEUDO_PARENTS = {"p", "li", "div", "dd", "section", "article", "td", "blockquote", "main", "body", "#document"}


def looks_like_html(text: str) -> bool:
    """True when a file without an HTML suffix is still an HTML page."""
    return bool(re.match(r"\s*(<!doctype html|<html|<\?xml[^>]*>\s*<html)", text[:1000], re.I))


def read_html(text: str, *, name_says_faq: bool = False, parser_lines: bool = True,
              where: str | None = None) -> tuple[list[Item], bool, list[Pair]]:
    """Parse a page into FAQ items; also return whether it is an FAQ page and its JSON-LD pairs.

    `parser_lines=False` is for HTML rendered from Markdown, whose lines come from attributes;
    `where` names the file in the error for a page over `htmltree.MAX_ELEMENTS` elements.
    """
    root = parse_html(text, parser_lines=parser_lines, where=where)
    titles = [heading_text(n) for n in root.find_all("title", "h1")]
    jsonld = jsonld_pairs(root)
    content = clean_page(root)
    page_is_faq = name_says_faq or any(is_faq_title(t) for t in titles)
    accepted, categories = resolve(candidates(content), content)
    consumed = {id(p) for c in accepted.values() for p in c.panels}
    # A category's own label (a <summary>) is a marker in the stream, not text of the previous answer.
    consumed |= {id(c.qnode) for c in categories.values() if c.qnode is not None and c.qnode is not c.root}
    boundaries = _boundary_nodes(content, accepted, categories)
    items: list[Item] = []
    _walk(content, items, accepted, categories, consumed, boundaries)
    return items, page_is_faq, jsonld


def _boundary_nodes(content: Node, accepted: dict, categories: dict) -> set[int]:
    """Ids of elements that hold a question somewhere inside, so the walk must open them."""
    marks: list[Node] = [n for n in content.iter() if n.tag in HEADINGS or id(n) in accepted or id(n) in categories]
    for node in content.iter():
        if node.tag in _PSEUDO_PARENTS and any(_pseudo(run, node) for run in _runs(node)):
            marks.append(node)
    found: set[int] = set()
    for mark in marks:
        for node in mark.lineage():
            if id(node) in found:
                break  # and so are all above it: each element is added once
            found.add(id(node))
    return found


def _pieces(node: Node, boundaries: set[int] | None = None) -> list[tuple[str, list[Node | str]]]:
    """The node's children as ("run", inline children) and ("node", [block child]) pieces.

    Block children, and inline children that hold a question (`boundaries`), stand alone. A
    bold question right after a line break starts a new run, for pages that write a whole FAQ
    as one paragraph: `<b>Q1?</b><br>A1<br><br><b>Q2?</b><br>A2`.
    """
    pieces: list[tuple[str, list[Node | str]]] = []
    run: list[Node | str] = []
    after_break = False
    for child in node.children:
        if isinstance(child, Node) and child.tag in SKIP:
            continue
        if isinstance(child, Node) and (child.tag in BLOCK or (boundaries is not None and id(child) in boundaries)):
            pieces += [("run", run)] if run else []
            pieces.append(("node", [child]))
            run, after_break = [], False
            continue
        if isinstance(child, Node) and child.tag in ("strong", "b") and after_break \
                and looks_like_question(heading_text(child)):
            pieces += [("run", run)] if run else []
            run = []
        run.append(child)
        if isinstance(child, Node) or child.strip():
            after_break = isinstance(child, Node) and child.tag == "br"
    return pieces + ([("run", run)] if run else [])


def _runs(node: Node) -> list[list[Node | str]]:
    """The node's runs of inline content (see `_pieces`)."""
    return [children for kind, children in _pieces(node) if kind == "run"]


def _run_node(run: list[Node | str]) -> Node:
    fake = Node("#run", {}, None, None, 0)
    fake.children = list(run)
    return fake


def _pseudo(run: list[Node | str], parent: Node) -> tuple[str, str, bool] | None:
    """A paragraph that opens with a question → (question, rest of the paragraph, strong).

    Strong: a `Q:` prefix or a bold question. Weak (counted only in an FAQ scope): a short
    one-sentence paragraph that is nothing but a question, such as `<p>How do I pay?</p>`;
    list items and lone links are left out, as they are usually a table of contents.
    """
    meaningful = [c for c in run if (c.strip() if isinstance(c, str)
                                     else (c.tag == "br" or any(t.strip() for t in c.strings())))]
    if not meaningful:
        return None
    first = meaningful[0]
    # This runs for every paragraph, and a broken page's paragraph can hold the rest of the page:
    # a long one is rendered only when it opens with a `Q:` or a short bold text.
    head, whole = _run_node(run).text_head(_QUESTION_CHARS)
    bold_first = isinstance(first, Node) and first.tag in ("strong", "b") and first.text_head(_QUESTION_CHARS)[1]
    if not whole and not Q_PREFIX.match(head) and not bold_first:
        return None
    text = render(_run_node(run))
    if Q_PREFIX.match(text):
        return (*split_q_prefixed(text), True)
    if bold_first:
        bold = heading_text(first)
        if looks_like_question(bold) and text.startswith(bold):
            return bold, text[len(bold):].strip(), True
    lone_link = len(meaningful) == 1 and isinstance(first, Node) and first.tag == "a"
    if parent.tag in ("p", "div") and not lone_link and text.endswith(QUESTION_MARKS) and len(text) <= 150 \
            and "\n" not in text and not re.search(r"[.!?]\s", text):
        return text, "", False
    return None


def _walk(node: Node, items: list[Item], accepted: dict, categories: dict, consumed: set, boundaries: set) -> None:
    """Append the items of `node`'s content to `items`, in reading order."""
    pieces = _pieces(node, boundaries)
    for kind, children in pieces:
        if kind == "run":
            _add_run(node, children, len(pieces) == 1, items)
            continue
        child = children[0]
        if id(child) in consumed:
            continue
        if id(child) in accepted:
            cand = accepted[id(child)]
            if cand.body is not None:
                answer = render(_run_node(cand.body))
            else:
                answer = "\n\n".join(t for t in (render_element(p) for p in cand.panels) if t)
            strong = cand.explicit or looks_like_question(cand.question)
            items.append(Item("pair", cand.question, 7, answer, strong, child.first_line(), cand.anchor, cand.via))
        elif id(child) in categories:
            level = int(child.tag[1]) if child.tag in HEADINGS else 6
            items.append(Item("category", categories[id(child)].question, level))
            if child.tag not in HEADINGS:
                _walk(child, items, accepted, categories, consumed, boundaries)
        elif child.tag in HEADINGS:
            items.append(Item("heading", heading_text(child), int(child.tag[1]), line=child.line,
                              anchor=anchor_of(child)))
        elif id(child) in boundaries:
            _walk(child, items, accepted, categories, consumed, boundaries)
        else:
            text = render_element(child)
            if text:
                items.append(Item("block", text))


def _add_run(node: Node, run: list[Node | str], whole: bool, items: list[Item]) -> None:
    """One run of inline content: a pseudo question, or a text block."""
    pseudo = _pseudo(run, node)
    elements = [c for c in run if isinstance(c, Node)]
    if pseudo:
        line = next((c.first_line() for c in elements if c.first_line()), node.first_line())
        anchor = anchor_of(*elements) or (anchor_of(node) if whole else None)
        via = "q-prefix" if Q_PREFIX.match(pseudo[0]) else "bold" if pseudo[2] else "paragraph"
        items.append(Item("pseudo", pseudo[0], 7, pseudo[1], pseudo[2], line, anchor, via))
    else:
        text = render(_run_node(run))
        if text:
            items.append(Item("block", text))
