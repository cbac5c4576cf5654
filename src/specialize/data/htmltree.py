"""A small HTML element tree on top of the standard library's `html.parser`.

Saved web pages are rarely valid HTML, so the builder follows the few browser rules that
matter for text extraction: void elements never nest, a block start tag closes an open `<p>`,
`<li>`/`<dt>`/`<dd>`/`<tr>`/`<td>` close their open siblings, and stray end tags are ignored.
Every element keeps the source line it started on (or the `data-source-line` attribute that
the Markdown reader puts on rendered blocks), so pairs can point back into the file.

Hostile or broken pages cannot make reading them slow: nesting is capped (`MAX_DEPTH`), and a
page of more than `MAX_ELEMENTS` elements is refused with one line naming it, before any of
the readers' passes over the tree run. Everything that reads the tree visits each element a
bounded number of times (no per-element walks over whole subtrees), so time grows linearly.
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from specialize.errors import UserError

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
        "track", "wbr"}
# Start tags that end an open paragraph, as browsers do ("<p>a<div>b" puts the div after the p).
CLOSES_P = {"address", "article", "aside", "blockquote", "details", "dialog", "div", "dl", "fieldset",
            "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
            "main", "nav", "ol", "p", "pre", "section", "summary", "table", "ul"}
INLINE = {"a", "abbr", "b", "bdi", "bdo", "cite", "code", "data", "dfn", "em", "font", "i", "kbd", "mark",
          "q", "s", "samp", "small", "span", "strong", "sub", "sup", "time", "u", "var", "label"}
# tag -> (tags it closes when still open, tags that stop the search for them)
_SIBLING_CLOSE = {
    "li": ({"li"}, {"ul", "ol", "menu"}),
    "dt": ({"dt", "dd"}, {"dl"}),
    "dd": ({"dt", "dd"}, {"dl"}),
    "tr": ({"tr", "td", "th"}, {"table", "thead", "tbody", "tfoot"}),
    "td": ({"td", "th"}, {"tr", "table"}),
    "th": ({"td", "th"}, {"tr", "table"}),
    "option": ({"option"}, {"select", "datalist"}),
}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# Pages with thousands of unclosed <div>s exist, and the readers walk the tree recursively:
# at this depth the deepest half of the open elements is closed, as if their end tags came.
MAX_DEPTH = 200
# A 1 MB help-centre page holds about 20,000 elements; reading one takes about 50 µs per
# element, so this bounds one page at a few seconds. More is generated or hostile markup.
MAX_ELEMENTS = 100_000


class Node:
    """One element: tag, attributes, children (elements or text strings) and source line."""

    __slots__ = ("tag", "attrs", "children", "parent", "line", "index")

    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None, line: int | None, index: int):
        self.tag = tag
        self.attrs = attrs
        self.children: list[Node | str] = []
        self.parent = parent
        self.line = line
        self.index = index  # document order, for sorting results found by different strategies

    def __repr__(self) -> str:
        return f"<{self.tag} line={self.line}>"

    def get(self, name: str, default: str = "") -> str:
        return self.attrs.get(name, default)

    def classes(self) -> list[str]:
        return self.get("class").lower().split()

    def elements(self) -> Iterator[Node]:
        """Child elements (text children skipped)."""
        return (c for c in self.children if isinstance(c, Node))

    def iter(self) -> Iterator[Node]:
        """This element and every descendant element, in document order."""
        stack: list[Node] = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed([c for c in node.children if isinstance(c, Node)]))

    def find_all(self, *tags: str) -> list[Node]:
        return [n for n in self.iter() if n.tag in tags]

    def ancestors(self) -> Iterator[Node]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def lineage(self) -> Iterator[Node]:
        """This element, then its ancestors up to the document (lazily: callers stop early)."""
        node: Node | None = self
        while node is not None:
            yield node
            node = node.parent

    def has_ancestor(self, *tags: str) -> bool:
        return any(a.tag in tags for a in self.ancestors())

    def contains(self, other: Node) -> bool:
        return other is self or any(a is self for a in other.ancestors())

    def strings(self) -> Iterator[str]:
        """The text below this element in order, as `raw_text()` joins it, one piece at a time."""
        stack = [iter(self.children)]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
            elif isinstance(child, str):
                yield child
            elif child.tag == "br":
                yield "\n"
            elif child.tag not in ("script", "style", "template"):
                stack.append(iter(child.children))

    def text_head(self, limit: int, pieces: int = 16) -> tuple[str, bool]:
        """The start of `raw_text()` and whether that is all of it: reading stops past `limit`
        characters or `pieces` text pieces (a label in more pieces than that is no label).

        For checks on short labels ("Back to top", an icon glyph, a question) that run on many
        elements: reading each one's whole subtree would cost the depth of the page per element.
        """
        parts: list[str] = []
        size = 0
        for text in self.strings():
            parts.append(text)
            size += len(text)
            if size > limit or len(parts) > pieces:
                return "".join(parts), False
        return "".join(parts), True

    def short_text(self, limit: int) -> str | None:
        """`raw_text()` when it is at most `limit` characters, else None (see `text_head`)."""
        text, complete = self.text_head(limit)
        return text if complete else None

    def raw_text(self) -> str:
        """All text below this element exactly as written (`<br>` as a newline); for `<pre>`."""
        return "".join(self.strings())

    def remove(self) -> None:
        """Detach this element from the tree."""
        if self.parent is not None:
            self.parent.children = [c for c in self.parent.children if c is not self]
            self.parent = None

    def replace_children(self, children: list[Node | str]) -> None:
        for child in children:
            if isinstance(child, Node):
                child.parent = self
        self.children = children

    def first_line(self) -> int | None:
        """The source line of this element, or of its first descendant that has one."""
        for node in self.iter():
            if node.line is not None:
                return node.line
        return None


class _TreeBuilder(HTMLParser):
    def __init__(self, use_parser_lines: bool, where: str | Path | None):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None, None, 0)
        self.stack: list[Node] = [self.root]
        self.count = 0
        self.use_parser_lines = use_parser_lines
        self.where = where

    def _open(self, tag: str, attrs: list[tuple[str, str | None]]) -> Node:
        self._close_implied(tag)
        attr_map = {k.lower(): (v if v is not None else "") for k, v in attrs}
        line: int | None = self.getpos()[0] if self.use_parser_lines else None
        if "data-source-line" in attr_map:
            line = int(attr_map.pop("data-source-line"))
        self.count += 1
        if self.count > MAX_ELEMENTS:
            raise UserError(f"more than {MAX_ELEMENTS:,} HTML elements in one page (generated or broken markup?); "
                            "split it, or leave it out", path=self.where, line=self.getpos()[0])
        node = Node(tag, attr_map, self.stack[-1], line, self.count)
        self.stack[-1].children.append(node)
        return node

    def _close_implied(self, tag: str) -> None:
        if tag in HEADINGS and self.stack[-1].tag in HEADINGS:
            self.stack.pop()  # a heading right inside an unclosed heading ends it, as in browsers
        if tag in CLOSES_P:
            # Close an open <p> when only inline elements sit above it.
            for i in range(len(self.stack) - 1, 0, -1):
                if self.stack[i].tag == "p":
                    del self.stack[i:]
                    break
                if self.stack[i].tag not in INLINE:
                    break
        if tag in _SIBLING_CLOSE:
            closes, stops = _SIBLING_CLOSE[tag]
            for i in range(len(self.stack) - 1, 0, -1):
                if self.stack[i].tag in closes:
                    del self.stack[i:]
                    break
                if self.stack[i].tag in stops:
                    break

    def handle_starttag(self, tag, attrs):
        if tag == "form" and any(n.tag == "form" for n in self.stack):
            return  # forms do not nest: browsers ignore the inner start tag
        if len(self.stack) >= MAX_DEPTH:
            del self.stack[MAX_DEPTH // 2:]
        node = self._open(tag, attrs)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self._open(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "br":  # browsers read a stray </br> as <br>
            self._open("br", [])
            return
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return
        # An end tag with nothing open to close is ignored, as browsers do.

    def handle_data(self, data):
        children = self.stack[-1].children
        if children and isinstance(children[-1], str):
            children[-1] += data
        else:
            children.append(data)


def parse_html(text: str, *, parser_lines: bool = True, where: str | Path | None = None) -> Node:
    """Parse HTML into a tree rooted at a `#document` node.

    Args:
        text: the page.
        parser_lines: take element lines from the parser; off for HTML rendered from Markdown,
            whose parser lines mean nothing and whose blocks carry `data-source-line` instead.
        where: the file, named in the error for a page over `MAX_ELEMENTS`.

    Raises:
        UserError: the page has more than `MAX_ELEMENTS` elements.
    """
    builder = _TreeBuilder(parser_lines, where)
    builder.feed(text)
    builder.close()
    return builder.root
