"""Clean readable text from an HTML tree: boilerplate removed, lists and code kept readable.

The one HTML-to-text of specialize: `convert` (FAQ pages, docs for the generator) and RAG
(`retrieval`, HTML documents) read a page through `html_to_text`, so both see the same text.
`clean_page` removes what is not content (navigation, page header and footer, sidebars,
scripts, forms, cookie banners, "back to top" and permalink anchors) and returns the content
root (the page's single `<main>` when there is one). `render` turns any element into plain
text in a light Markdown style: paragraphs separated by a blank line, `- ` / `1. ` list
items, code blocks in ``` fences, table rows as `a | b`.
"""

from __future__ import annotations

import re
from pathlib import Path

from specialize.data.htmltree import HEADINGS, Node, parse_html

SKIP = {"script", "style", "noscript", "template", "head", "title", "svg", "iframe", "object", "canvas",
        "select", "input", "textarea", "img", "picture", "video", "audio", "map", "meta", "link"}
BLOCK = {"address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details",
         "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header",
         "hr", "html", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody",
         "td", "tfoot", "th", "thead", "tr", "ul", "menu", "#document"} | HEADINGS
# Class or id tokens of page furniture that is never part of an answer.
JUNK_TOKENS = {"breadcrumb", "breadcrumbs", "skip-link", "screen-reader-text", "sr-only", "visually-hidden",
               "headerlink", "anchorjs-link", "header-anchor", "sphinxsidebar", "comments", "comments-area",
               "comment-respond", "share", "sharing", "social-share", "cookie-notice", "cookie-banner",
               "consent-banner", "toc", "table-of-contents",
               "navheader", "navfooter"}  # DocBook's previous/up/next bars
JUNK_ROLES = {"navigation", "banner", "contentinfo", "search", "complementary"}
# Links that only move the reader around ("Back to top", "Return to Table of Contents"), and
# permalink marks, which count only as same-page links ("Top" may also be a real page).
_JUMP_LINK = re.compile(r"^\W*(back|return|go|scroll|jump|skip)\s+to\s+(the\s+)?(top|table of contents|contents|"
                        r"toc|content|main content)\W*$", re.I)
_PERMALINK = re.compile(r"^\W*(top|[¶#§🔗])\W*$", re.I)
_SPACE = re.compile(r"[ \t\n\r\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BREAK = "\x00"  # stands for <br> until whitespace has been collapsed
_SHORT = 200  # characters: more than any jump link or icon glyph, with its white space
_CONTENT = {"article", "section", "details"}


def _is_junk(node: Node) -> bool:
    tag = node.tag
    # (forms never nest, see htmltree, so this walk over a form's content runs once per element)
    if tag in ("nav", "footer", "form") and not (tag == "form" and node.find_all("p", "dl", "details", *HEADINGS)):
        # Whole-page ASP.NET <form> wrappers hold the content, so only forms without text blocks go.
        return True
    if node.get("role") in JUNK_ROLES:
        return True
    tokens = set(node.classes()) | {node.get("id").lower()}
    if tokens & JUNK_TOKENS or any(t.startswith(("cookie", "gdpr")) for t in tokens):
        return True
    if node.get("aria-hidden") == "true":
        glyph = node.short_text(_SHORT)
        if glyph is not None and len(_SPACE.sub("", glyph)) <= 2:
            return True  # icon glyphs such as "+" and "−" in accordion toggles
    if tag == "a":
        text = (node.short_text(_SHORT) or "-" * (_SHORT + 1)).strip()  # a long text is no jump link
        if _JUMP_LINK.match(text) or (node.get("href").startswith("#") and _PERMALINK.match(text or "#")):
            return True
    return False


def html_to_text(html: str, where: str | Path | None = None) -> tuple[str, str]:
    """(title, readable text) of an HTML page: its `<title>`, and its content without boilerplate.

    Raises:
        UserError: naming `where`, for a page over `htmltree.MAX_ELEMENTS` elements.
    """
    root = parse_html(html, where=where)
    title = next((heading_text(n) for n in root.find_all("title")), "")  # before clean_page drops <head>
    return title, render(clean_page(root))


def clean_page(root: Node) -> Node:
    """Remove boilerplate from a parsed page in place; return the element holding the content."""
    _clean(root)
    mains = [n for n in root.iter() if n.tag == "main" or n.get("role") == "main"]
    return mains[0] if len(mains) == 1 else root


def _clean(node: Node, in_content: bool = False, in_main: bool = False) -> None:
    """Remove junk below `node`; `in_content`/`in_main`: `node` is or sits in an article, section,
    details / a main element (passed down rather than looked up per element)."""
    kept: list[Node | str] = []
    for child in node.children:
        if isinstance(child, str):
            kept.append(child)
        elif child.tag in SKIP or _is_junk(child):
            child.parent = None
        elif child.tag == "aside" and not in_content:
            child.parent = None  # page sidebars; asides inside an article are notes and stay
        elif child.tag == "header" and not (in_content or in_main):
            child.parent = None
        elif child.tag == "header":
            # An article header holds the title heading plus author/date/subscribe lines: keep the title.
            child.replace_children(child.find_all(*HEADINGS))
            kept.append(child)
        else:
            _clean(child, in_content or child.tag in _CONTENT, in_main or child.tag == "main")
            kept.append(child)
    node.children = kept  # one new list: removing children one by one costs a pass over them each


def _own_rows(table: Node) -> list[Node]:
    """The table's rows, not those of tables nested in its cells (those render inside their cell;
    taking them here too would render every level again at each level above it)."""
    rows: list[Node] = []
    stack = list(reversed(list(table.elements())))
    while stack:
        node = stack.pop()
        if node.tag == "tr":
            rows.append(node)
        elif node.tag != "table":
            stack.extend(reversed(list(node.elements())))
    return rows


def heading_text(node: Node) -> str:
    """One-line text of a heading (or any element), without permalink marks."""
    return re.sub(r"\s*[¶#§]+$", "", " ".join(render(node).split()))


def render(node: Node) -> str:
    """Readable plain text of an element's content."""
    return _join(_segments(node), tight=False)


def render_element(node: Node) -> str:
    """Readable plain text of an element itself (a list keeps its bullets, a <pre> its fence)."""
    if node.tag in BLOCK:
        return _block(node).strip("\n")
    return _join(_segments(node), tight=False)


def _segments(node: Node) -> list[tuple[bool, str]]:
    """Content as (is_block, text) pieces: inline text runs and rendered block children."""
    out: list[tuple[bool, str]] = []
    for child in node.children:
        if isinstance(child, str):
            out.append((False, child.replace("\u200b", "")))
        elif child.tag in SKIP:
            continue
        elif child.tag == "br":
            out.append((False, _BREAK))
        elif child.tag in BLOCK:
            out.append((True, _block(child)))
        else:
            inner = _segments(child)
            if child.tag == "code" and inner and not any(block for block, _ in inner):
                code = "".join(t for _, t in inner).strip()
                inner = [(False, f"`{code}`")] if code else []
            out.extend(inner)
    return out


def _paragraph(text: str) -> str:
    lines = _SPACE.sub(" ", text).split(_BREAK)
    return "\n".join(line.strip() for line in lines).strip()


def _join(segments: list[tuple[bool, str]], tight: bool) -> str:
    parts: list[str] = []
    run: list[str] = []
    for is_block, text in segments + [(True, "")]:
        if not is_block:
            run.append(text)
            continue
        paragraph = _paragraph("".join(run))
        run = []
        if paragraph:
            parts.append(paragraph)
        if text.strip():
            parts.append(text.strip("\n"))
    return ("\n" if tight else "\n\n").join(parts)


def _indent(text: str, prefix: str) -> str:
    pad = " " * len(prefix)
    lines = text.split("\n")
    return "\n".join([prefix + lines[0]] + [pad + line if line else line for line in lines[1:]])


def _block(node: Node) -> str:
    tag = node.tag
    if tag == "pre":
        code = node.raw_text().replace("\r\n", "\n").strip("\n")
        code = "\n".join(line.rstrip() for line in code.split("\n"))
        langs = [c[len("language-"):] for n in [node, *node.elements()] for c in n.classes()
                 if c.startswith("language-")]
        return f"```{langs[0] if langs else ''}\n{code}\n```" if code.strip() else ""
    if tag in ("ul", "ol", "menu"):
        number = int(node.get("start") or 1) if node.get("start").isdigit() else 1
        items = []
        for item in node.elements():
            text = _join(_segments(item), tight=True) if item.tag == "li" else _block(item)
            if not text:
                continue
            prefix = f"{number}. " if tag == "ol" else "- "
            items.append(_indent(text, prefix) if item.tag == "li" else text)
            number += item.tag == "li"
        return "\n".join(items)
    if tag == "table":
        rows = []
        for row in _own_rows(node):
            cells = [" ".join(_join(_segments(c), tight=True).split()) for c in row.elements() if c.tag in ("td", "th")]
            if any(cells):
                rows.append(" | ".join(cells))
        return "\n".join(rows)
    if tag == "dl":
        lines = []
        for item in node.elements():
            text = _join(_segments(item), tight=True)
            if text:
                lines.append(_indent(text, "  ") if item.tag == "dd" else text)
        return "\n".join(lines)
    if tag == "blockquote":
        text = _join(_segments(node), tight=False)
        return "\n".join(("> " + line).rstrip() for line in text.split("\n")) if text else ""
    if tag == "hr":
        return ""
    if tag in HEADINGS:
        return heading_text(node)
    return _join(_segments(node), tight=tag in ("li", "dd", "dt", "td", "th", "summary"))
