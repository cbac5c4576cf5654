"""A small HTML element tree on top of the standard library's `html.parser`.

Saved web pages are rarely valid HTML, so the builder follows the few browser rules that
matter for text extraction: void elements never nest, a block start tag closes an open `<p>`,
`<li>`/`<dt>`/`<dd>`/`<tr>`/`<td>` close their open siblings, and stray end tags are ignored.
Every element keeps the source line it started on (or the `data-source-line` attribute that
the Markdown reader puts on rendered blocks), so pairs can point back into the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

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

    def has_ancestor(self, *tags: str) -> bool:
        return any(a.tag in tags for a in self.ancestors())

    def contains(self, other: Node) -> bool:
        return other is self or any(a is self for a in other.ancestors())

    def raw_text(self) -> str:
        """All text below this element exactly as written (`<br>` as a newline); for `<pre>`."""
        parts: list[str] = []
        for child in self.children:
            if isinstance(child, str):
                parts.append(child)
            elif child.tag == "br":
                parts.append("\n")
            elif child.tag not in ("script", "style", "template"):
                parts.append(child.raw_text())
        return "".join(parts)

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
    def __init__(self, use_parser_lines: bool):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None, None, 0)
        self.stack: list[Node] = [self.root]
        self.count = 0
        self.use_parser_lines = use_parser_lines

    def _open(self, tag: str, attrs: list[tuple[str, str | None]]) -> Node:
        self._close_implied(tag)
        attr_map = {k.lower(): (v if v is not None else "") for k, v in attrs}
        line: int | None = self.getpos()[0] if self.use_parser_lines else None
        if "data-source-line" in attr_map:
            line = int(attr_map.pop("data-source-line"))
        self.count += 1
        node = Node(tag, attr_map, self.stack[-1], line, self.count)
        self.stack[-1].children.append(node)
        return node

    def _close_implied(self, tag: str) -> None:
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


def parse_html(text: str, *, parser_lines: bool = True) -> Node:
    """Parse HTML into a tree rooted at a `#document` node.

    Args:
        text: the page.
        parser_lines: take element lines from the parser; off for HTML rendered from Markdown,
            whose parser lines mean nothing and whose blocks carry `data-source-line` instead.
    """
    builder = _TreeBuilder(parser_lines)
    builder.feed(text)
    builder.close()
    return builder.root
