"""HTML pages → the FAQ item stream (see faq.py), whatever generator made the page.

Structured question/answer markup is found first, each kind by its own detector:
- schema.org microdata (`itemtype=…/Question`, `itemprop="name"` / `acceptedAnswer`);
- `<details><summary>` disclosures;
- accordions: a toggle with `aria-controls`, `data-(bs-)target` or a collapse `href="#id"`
  and the panel it opens (Bootstrap, Elementor, jQuery UI, most WordPress plugins), also
  panels that name their toggle with `aria-labelledby`;
- class pairs: an element whose class says question (`faq-question`, `schema-faq-question`,
  `rank-math-question`, `et_pb_toggle_title`, …) followed by a sibling whose class says answer;
- `<dl>` definition lists (`<dt>` question, `<dd>` answer), except API reference lists.
An item whose panel holds further questions is a category, not a question. Everything else is
read in order as headings, bold-question paragraphs and text blocks. JSON-LD `FAQPage` data
is parsed as well and adds the questions the visible page lacks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from specialize.data.convert.faq import (A_PREFIX, Q_PREFIX, QUESTION_MARKS, Item, Pair, clean_question, is_faq_title,
                                         looks_like_question, split_q_prefixed)
from specialize.data.convert.htmltext import BLOCK, SKIP, clean_page, heading_text, render, render_element
from specialize.data.convert.htmltree import HEADINGS, INLINE, VOID, Node, parse_html

_Q_CLASS = re.compile(r"(^|[-_])(question|faq[-_]?q|faq[-_]?(title|header|heading|toggle|trigger)|"
                      r"(toggle|accordion|collapsible)[-_]?(title|header|heading|trigger))$")
_A_CLASS = re.compile(r"(^|[-_])(answer|faq[-_]?a|faq[-_]?(content|body|panel|text)|"
                      r"(toggle|accordion|collapsible)[-_]?(content|body|panel|collapse))$")
# Definition lists that are API references or footnotes, never questions.
_DL_NOT_FAQ = {"field-list", "footnote", "citation", "option-list", "py", "cpp", "c", "js", "rst", "function",
               "class", "method", "attribute", "exception", "describe", "glossary"}
_PANEL_TAGS = {"div", "section", "dd", "ul", "ol", "p", "article"}
# JSON-LD answer text is HTML only when it holds a real tag: a closing tag, or a known tag
# written in lower case. "Press <Enter> to confirm" or "<Select> a plan" is plain text.
_HTML_TAG = re.compile(r"</[a-zA-Z][\w-]*\s*>|<([a-z][a-z0-9]*)(?:\s[^<>]*)?/?>")
_KNOWN_TAGS = BLOCK | SKIP | INLINE | VOID | {"del", "ins", "button"}
_PSEUDO_PARENTS = {"p", "li", "div", "dd", "section", "article", "td", "blockquote", "main", "body", "#document"}


@dataclass
class _Candidate:
    root: Node  # where the question sits in reading order
    question: str
    panels: list[Node]  # the answer's elements
    via: str
    anchor: str | None = None
    qnode: Node | None = None  # the element holding the question text, when it is not the root
    explicit: bool = False  # the markup itself says "question" (microdata, a `…question` class)
    # The answer's content when it is more than whole elements: everything after a <summary>,
    # where loose text ("By card, or by <b>invoice</b>") is as much the answer as a <p>.
    body: list[Node | str] | None = None


def looks_like_html(text: str) -> bool:
    """True when a file without an HTML suffix is still an HTML page."""
    return bool(re.match(r"\s*(<!doctype html|<html|<\?xml[^>]*>\s*<html)", text[:1000], re.I))


def page_text(text: str) -> str:
    """Readable text of a whole page, boilerplate removed."""
    return render(clean_page(parse_html(text)))


def read_html(text: str, *, name_says_faq: bool = False,
              parser_lines: bool = True) -> tuple[list[Item], bool, list[Pair]]:
    """Parse a page into FAQ items; also return whether it is an FAQ page and its JSON-LD pairs.

    `parser_lines=False` is for HTML rendered from Markdown, whose lines come from attributes.
    """
    root = parse_html(text, parser_lines=parser_lines)
    titles = [heading_text(n) for n in root.find_all("title", "h1")]
    jsonld = _jsonld_pairs(root)
    content = clean_page(root)
    page_is_faq = name_says_faq or any(is_faq_title(t) for t in titles)
    accepted, categories = _resolve(_candidates(content))
    consumed = {id(p) for c in accepted.values() for p in c.panels}
    # A category's own label (a <summary>) is a marker in the stream, not text of the previous answer.
    consumed |= {id(c.qnode) for c in categories.values() if c.qnode is not None and c.qnode is not c.root}
    boundaries = _boundary_nodes(content, accepted, categories)
    items: list[Item] = []
    _walk(content, items, accepted, categories, consumed, boundaries)
    return items, page_is_faq, jsonld


def _anchor(*nodes: Node | None) -> str | None:
    """The first fragment id that links to one of these elements (their own, a wrapper's, or inside)."""
    for node in nodes:
        if node is None:
            continue
        if node.get("id"):
            return node.get("id")
        parent = node.parent
        if node.tag in HEADINGS and parent is not None and parent.get("id") and next(parent.elements(), None) is node:
            return parent.get("id")  # Sphinx and many themes put the id on the <section> a heading opens
        for inner in node.iter():
            if inner.get("id") or (inner.tag == "a" and inner.get("name")):
                return inner.get("id") or inner.get("name")
    return None


def _candidates(content: Node) -> list[_Candidate]:
    """Questions found by markup (microdata, details, accordions, class pairs, dl), outer ones included."""
    ids = {n.get("id"): n for n in content.iter() if n.get("id")}
    found: list[_Candidate] = []
    for node in content.iter():
        itemtype = node.get("itemtype").lower()
        if "schema.org/question" in itemtype:
            name = next((n for n in node.iter() if "name" in n.get("itemprop").split()), None)
            answer = next((n for n in node.iter() if {"acceptedanswer", "suggestedanswer"}
                           & set(n.get("itemprop").lower().split())), None)
            if name is not None and answer is not None:
                text = next((n for n in answer.iter() if "text" in n.get("itemprop").split()), answer)
                found.append(_Candidate(node, heading_text(name), [text], "microdata", _anchor(node, name), name,
                                        explicit=True))
        elif node.tag == "details":
            summary = next((n for n in node.elements() if n.tag == "summary"), None)
            if summary is not None:
                body = [c for c in node.children if c is not summary]
                rest = [n for n in body if isinstance(n, Node)]
                found.append(_Candidate(node, heading_text(summary), rest, "details", _anchor(node, summary),
                                        summary, body=body))
        elif node.tag == "dl" and not set(node.classes()) & _DL_NOT_FAQ:
            found.extend(_dl_candidates(node))
        else:
            target = _toggle_target(node)
            panel = ids.get(target) if target else None
            if panel is None and node.get("aria-labelledby") in ids and node.tag in _PANEL_TAGS \
                    and node.get("role") != "button":
                panel, node = node, ids[node.get("aria-labelledby")]
            if panel is not None and not panel.contains(node) and not node.contains(panel):
                heading = next((a for a in [node, *list(node.ancestors())[:3]] if a.tag in HEADINGS), None)
                found.append(_Candidate(heading or node, heading_text(node), [panel], "accordion",
                                        _anchor(heading or node, panel), node))
            elif any(_Q_CLASS.search(c) for c in node.classes()):
                sibling = _next_element(node)
                if sibling is not None and any(_A_CLASS.search(c) for c in sibling.classes()):
                    explicit = any("question" in c for c in node.classes())
                    found.append(_Candidate(node, heading_text(node), [sibling], "class",
                                            _anchor(node, node.parent), node, explicit))
    # One question found twice (a Bootstrap header is both an aria toggle and a class pair): keep the first.
    unique: dict[int, _Candidate] = {}
    panels: set[int] = set()
    for cand in found:
        first_panel = id(cand.panels[0]) if cand.panels else None
        if cand.question and id(cand.root) not in unique and (first_panel is None or first_panel not in panels):
            unique[id(cand.root)] = cand
            panels.add(first_panel)
    return list(unique.values())


def _toggle_target(node: Node) -> str | None:
    for attr in ("aria-controls", "data-target", "data-bs-target"):
        value = node.get(attr).strip().lstrip("#").split()
        if value:
            return value[0]  # aria-controls may list several ids; the first is the panel
    toggle = node.get("data-toggle") or node.get("data-bs-toggle")
    if toggle == "collapse" and node.get("href").startswith("#"):
        return node.get("href")[1:]
    return None


def _next_element(node: Node) -> Node | None:
    if node.parent is None:
        return None
    siblings = node.parent.children
    i = next(k for k, c in enumerate(siblings) if c is node)
    for sibling in siblings[i + 1:]:
        if isinstance(sibling, Node):
            return sibling
        if sibling.strip():
            return None
    return None


def _dl_candidates(dl: Node) -> list[_Candidate]:
    # HTML5 allows each <dt>/<dd> group to be wrapped in a <div>.
    entries = [n for child in dl.elements()
               for n in ([child] if child.tag in ("dt", "dd") else child.elements()) if n.tag in ("dt", "dd")]
    found: list[_Candidate] = []
    for i, node in enumerate(entries):
        if node.tag == "dt" and i + 1 < len(entries) and entries[i + 1].tag == "dd":
            answers = []
            for later in entries[i + 1:]:
                if later.tag != "dd":
                    break
                answers.append(later)
            found.append(_Candidate(node, heading_text(node), answers, "dl", _anchor(node), node))
    return found


def _resolve(cands: list[_Candidate]) -> tuple[dict[int, _Candidate], dict[int, _Candidate]]:
    """Split candidates into questions and categories (items whose panel holds further questions)."""
    ordered = sorted(cands, key=lambda c: c.root.index)
    owner = {id(p): k for k, c in enumerate(ordered) for p in c.panels}  # panel → candidate it answers
    inner: list[list[_Candidate]] = [[] for _ in ordered]
    for cand in ordered:
        for node in (cand.root, *cand.root.ancestors()):  # a panel may itself be the inner question
            if id(node) in owner:
                inner[owner[id(node)]].append(cand)
    accepted: dict[int, _Candidate] = {}
    categories: dict[int, _Candidate] = {}
    accepted_panels: set[int] = set()
    for k, cand in enumerate(ordered):
        if any(id(a) in accepted_panels for a in (cand.root, *cand.root.ancestors())):
            continue  # inside an accepted answer: part of that answer's text
        headings = [h for p in cand.panels for h in p.find_all(*HEADINGS)]
        if len(inner[k]) >= 2 or any(looks_like_question(c.question) for c in inner[k]) \
                or any(looks_like_question(heading_text(h)) for h in headings):
            categories[id(cand.root)] = cand
        else:
            accepted[id(cand.root)] = cand
            accepted_panels.update(id(p) for p in cand.panels)
    return accepted, categories


def _boundary_nodes(content: Node, accepted: dict, categories: dict) -> set[int]:
    """Ids of elements that hold a question somewhere inside, so the walk must open them."""
    marks: list[Node] = [n for n in content.iter() if n.tag in HEADINGS or id(n) in accepted or id(n) in categories]
    for node in content.iter():
        if node.tag in _PSEUDO_PARENTS and any(_pseudo(run, node) for run in _runs(node)):
            marks.append(node)
    found: set[int] = set()
    for node in marks:
        found.add(id(node))
        found.update(id(a) for a in node.ancestors())
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
    meaningful = [c for c in run if (c.strip() if isinstance(c, str) else (c.tag == "br" or c.raw_text().strip()))]
    if not meaningful:
        return None
    text = render(_run_node(run))
    first = meaningful[0]
    if Q_PREFIX.match(text):
        return (*split_q_prefixed(text), True)
    if isinstance(first, Node) and first.tag in ("strong", "b"):
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
                              anchor=_anchor(child)))
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
        anchor = _anchor(*elements) or (_anchor(node) if whole else None)
        via = "q-prefix" if Q_PREFIX.match(pseudo[0]) else "bold" if pseudo[2] else "paragraph"
        items.append(Item("pseudo", pseudo[0], 7, pseudo[1], pseudo[2], line, anchor, via))
    else:
        text = render(_run_node(run))
        if text:
            items.append(Item("block", text))


def _jsonld_pairs(root: Node) -> list[Pair]:
    pairs: list[Pair] = []
    for script in root.find_all("script"):
        if "ld+json" not in script.get("type").lower():
            continue
        try:
            data = json.loads(script.raw_text())
        except ValueError:
            continue  # broken structured data on a page is common and not the user's to fix
        for question in _jsonld_questions(data):
            name = question.get("name")
            answer = question.get("acceptedAnswer") or question.get("suggestedAnswer")
            answer = answer[0] if isinstance(answer, list) and answer else answer
            text = answer.get("text") if isinstance(answer, dict) else None
            if isinstance(name, str) and isinstance(text, str):
                html = parse_html(f"<div>{text}</div>" if _has_html_tag(text) else f"<div>{_escape(text)}</div>")
                ref = question.get("@id") or question.get("url") or ""
                anchor = ref.split("#", 1)[1] if isinstance(ref, str) and "#" in ref else None
                answer_text = A_PREFIX.sub("", render(html), count=1)
                pairs.append(Pair(clean_question(name), answer_text, script.line, anchor, "json-ld"))
    return pairs


def _has_html_tag(text: str) -> bool:
    return any(m.group(1) is None or m.group(1) in _KNOWN_TAGS for m in _HTML_TAG.finditer(text))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", "<br>")


def _jsonld_questions(data) -> list[dict]:
    """Question objects under any FAQPage in a JSON-LD document (plain, list or @graph).

    Yoast and others list only `{"@id": …}` references under `mainEntity` and put the Question
    objects elsewhere in the `@graph`, so references are resolved by id.
    """
    objects: list[dict] = []
    stack = [data]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(reversed(obj))
        elif isinstance(obj, dict):
            objects.append(obj)
            stack.extend(reversed([v for v in obj.values() if isinstance(v, (list, dict))]))
    by_id = {o["@id"]: o for o in objects if isinstance(o.get("@id"), str) and "name" in o}
    found: list[dict] = []
    for obj in objects:
        types = obj.get("@type")
        if "FAQPage" not in (types if isinstance(types, list) else [types]):
            continue
        entities = obj.get("mainEntity") or []
        for entity in entities if isinstance(entities, list) else [entities]:
            if isinstance(entity, dict) and "name" not in entity and isinstance(entity.get("@id"), str):
                entity = by_id.get(entity["@id"], entity)
            if isinstance(entity, dict) and entity not in found:
                found.append(entity)
    return found
