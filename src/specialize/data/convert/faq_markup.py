"""FAQ markup in HTML pages: questions that the page's structure marks as such, and JSON-LD.

Each kind of structured question/answer markup has its own detector:
- schema.org microdata (`itemtype=…/Question`, `itemprop="name"` / `acceptedAnswer`);
- `<details><summary>` disclosures;
- accordions: a toggle with `aria-controls`, `data-(bs-)target` or a collapse `href="#id"`
  and the panel it opens (Bootstrap, Elementor, jQuery UI, most WordPress plugins), also
  panels that name their toggle with `aria-labelledby`;
- class pairs: an element whose class says question (`faq-question`, `schema-faq-question`,
  `rank-math-question`, `et_pb_toggle_title`, …) followed by a sibling whose class says answer;
- `<dl>` definition lists (`<dt>` question, `<dd>` answer), except API reference lists.
`resolve` splits what was found into questions and categories (an item whose panel holds
further questions). `jsonld_pairs` reads JSON-LD `FAQPage` data. faq_html.py walks the page
and places these where they stand in reading order.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

from specialize.data.convert.questions import A_PREFIX, Pair, clean_question, looks_like_question
from specialize.data.htmltext import BLOCK, SKIP, heading_text, render
from specialize.data.htmltree import HEADINGS, INLINE, VOID, Node, parse_html

_Q_CLASS = re.compile(r"(^|[-_])(question|faq[-_]?q|faq[-_]?(title|header|heading|toggle|trigger)|"
                      r"(toggle|accordion|collapsible)[-_]?(title|header|heading|trigger))$")
_A_CLASS = re.compile(r"(^|[-_])(answer|faq[-_]?a|faq[-_]?(content|body|panel|text)|"
                      r"(toggle|accordion|collapsible)[-_]?(content|body|panel|collapse))$")
# Definition lists that are API references or footnotes, never questions.
_DL_NOT_FAQ = {"field-list", "footnote", "citation", "option-list", "py", "cpp", "c", "js", "rst", "function",
               "class", "method", "attribute", "exception", "describe", "glossary"}
_PANEL_TAGS = {"div", "section", "dd", "ul", "ol", "p", "article"}
_ANCHOR_SEARCH = 64  # elements searched for an id inside a question; the anchor opens it
_LABEL_CHARS = 2000  # a longer "question" is a broken page's everything-after, not a label
# JSON-LD answer text is HTML only when it holds a real tag: a closing tag, or a known tag
# written in lower case. "Press <Enter> to confirm" or "<Select> a plan" is plain text.
_HTML_TAG = re.compile(r"</[a-zA-Z][\w-]*\s*>|<([a-z][a-z0-9]*)(?:\s[^<>]*)?/?>")
_KNOWN_TAGS = BLOCK | SKIP | INLINE | VOID | {"del", "ins", "button"}


@dataclass
class Candidate:
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


def anchor_of(*nodes: Node | None) -> str | None:
    """The first fragment id that links to one of these elements (their own, a wrapper's, or inside)."""
    for node in nodes:
        if node is None:
            continue
        if node.get("id"):
            return node.get("id")
        parent = node.parent
        if node.tag in HEADINGS and parent is not None and parent.get("id") and next(parent.elements(), None) is node:
            return parent.get("id")  # Sphinx and many themes put the id on the <section> a heading opens
        for inner in itertools.islice(node.iter(), _ANCHOR_SEARCH):
            if inner.get("id") or (inner.tag == "a" and inner.get("name")):
                return inner.get("id") or inner.get("name")
    return None


def candidates(content: Node) -> list[Candidate]:
    """Questions found by markup (microdata, details, accordions, class pairs, dl), outer ones included."""
    ids = {n.get("id"): n for n in content.iter() if n.get("id")}
    following = _next_elements(content)
    found: list[Candidate] = []
    for node in content.iter():
        itemtype = node.get("itemtype").lower()
        if "schema.org/question" in itemtype:
            name = next((n for n in node.iter() if "name" in n.get("itemprop").split()), None)
            answer = next((n for n in node.iter() if {"acceptedanswer", "suggestedanswer"}
                           & set(n.get("itemprop").lower().split())), None)
            if name is not None and answer is not None:
                text = next((n for n in answer.iter() if "text" in n.get("itemprop").split()), answer)
                found.append(Candidate(node, _label(name), [text], "microdata", anchor_of(node, name), name,
                                        explicit=True))
        elif node.tag == "details":
            summary = next((n for n in node.elements() if n.tag == "summary"), None)
            if summary is not None:
                body = [c for c in node.children if c is not summary]
                rest = [n for n in body if isinstance(n, Node)]
                found.append(Candidate(node, _label(summary), rest, "details", anchor_of(node, summary),
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
                heading = next((a for a in [node, *itertools.islice(node.ancestors(), 3)] if a.tag in HEADINGS), None)
                found.append(Candidate(heading or node, _label(node), [panel], "accordion",
                                        anchor_of(heading or node, panel), node))
            elif any(_Q_CLASS.search(c) for c in node.classes()):
                sibling = following.get(id(node))
                if sibling is not None and any(_A_CLASS.search(c) for c in sibling.classes()):
                    explicit = any("question" in c for c in node.classes())
                    found.append(Candidate(node, _label(node), [sibling], "class",
                                            anchor_of(node, node.parent), node, explicit))
    # One question found twice (a Bootstrap header is both an aria toggle and a class pair): keep the first.
    unique: dict[int, Candidate] = {}
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


def _next_elements(content: Node) -> dict[int, Node]:
    """Each element → its next sibling element, when only white space lies between them."""
    following: dict[int, Node] = {}
    for node in content.iter():
        previous: Node | None = None
        for child in node.children:
            if isinstance(child, Node):
                if previous is not None:
                    following[id(previous)] = child
                previous = child
            elif child.strip():
                previous = None
    return following


def _label(node: Node) -> str:
    """The question text of an element ("" when it is too long to be one)."""
    return heading_text(node) if node.text_head(_LABEL_CHARS)[1] else ""


def _dl_candidates(dl: Node) -> list[Candidate]:
    # HTML5 allows each <dt>/<dd> group to be wrapped in a <div>.
    entries = [n for child in dl.elements()
               for n in ([child] if child.tag in ("dt", "dd") else child.elements()) if n.tag in ("dt", "dd")]
    found: list[Candidate] = []
    for i, node in enumerate(entries):
        if node.tag == "dt" and i + 1 < len(entries) and entries[i + 1].tag == "dd":
            end = i + 1
            while end < len(entries) and entries[end].tag == "dd":
                end += 1
            found.append(Candidate(node, _label(node), entries[i + 1:end], "dl", anchor_of(node), node))
    return found


def resolve(cands: list[Candidate], content: Node) -> tuple[dict[int, Candidate], dict[int, Candidate]]:
    """Split candidates into questions and categories (items whose panel holds further questions).

    A candidate is a category when its panel holds two or more candidates, or one that reads as
    a question, or a heading that does. What each element holds is counted once, from below:
    walking up from each candidate stops where the ancestors already know (no per-candidate
    walk over its panel, which would cost the page's depth per candidate).
    """
    question_inside: set[int] = set()  # elements holding a question-like heading or candidate
    found_inside: dict[int, int] = {}  # element → candidates at or below it (counted up to 2)
    for heading in content.iter():
        if heading.tag in HEADINGS and looks_like_question(_label(heading)):
            _mark_up(heading, question_inside)
    ordered = sorted(cands, key=lambda c: c.root.index)
    for cand in ordered:
        if looks_like_question(cand.question):
            _mark_up(cand.root, question_inside)
        for node in cand.root.lineage():
            count = found_inside.get(id(node), 0)
            if count >= 2:
                break  # and so do all above it
            found_inside[id(node)] = count + 1
    accepted: dict[int, Candidate] = {}
    categories: dict[int, Candidate] = {}
    accepted_panels: set[int] = set()
    for cand in ordered:
        if any(id(a) in accepted_panels for a in cand.root.lineage()):
            continue  # inside an accepted answer: part of that answer's text
        if sum(found_inside.get(id(p), 0) for p in cand.panels) >= 2 \
                or any(id(p) in question_inside for p in cand.panels):
            categories[id(cand.root)] = cand
        else:
            accepted[id(cand.root)] = cand
            accepted_panels.update(id(p) for p in cand.panels)
    return accepted, categories


def _mark_up(node: Node, marked: set[int]) -> None:
    """Add the node and its ancestors to `marked`, stopping at the first already there."""
    for element in node.lineage():
        if id(element) in marked:
            return
        marked.add(id(element))


def jsonld_pairs(root: Node) -> list[Pair]:
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
