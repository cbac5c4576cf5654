"""No import cycles in src/specialize, counting imports inside functions.

A cycle hidden in a function-level import still ties the modules together: neither can be
read, tested or moved without the other, and the import order decides what works. The graph
is read from the source with `ast` (nothing is imported): `import a.b`, `from a import b`
(an edge to the submodule `a.b` when there is one, else to the package `a`), relative imports,
at module level, inside functions and under `if TYPE_CHECKING:` alike. Importing `a.b.c` from
outside package `a.b` runs `a/b/__init__.py` first, so that is an edge too: `retrieval` importing
`data.convert.htmltext` would run convert's `__init__`, which imports the LLM converter; were
the converter to import `retrieval`, that is a cycle. A package's own `__init__` is not counted
as imported by its submodules (it has already run by then).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package __init__) for every .py file of `package`."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported(module: str, is_package: bool, tree: ast.AST, known: set[str]) -> set[str]:
    """The modules of `known` that `tree` (the source of `module`) imports anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, from ..data import y
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in known else source)
    with_packages = set(targets)
    for target in targets:  # the packages above the target that the importer is not inside
        parts = target.split(".")
        with_packages.update(p for p in (".".join(parts[:k]) for k in range(1, len(parts)))
                             if not (module == p or module.startswith(p + ".")))
    return {t for t in with_packages if t in known and t != module}


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    found = modules(src, package)
    return {name: imported(name, is_package, ast.parse(path.read_text(encoding="utf-8")), set(found))
            for name, (path, is_package) in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_around(graph, group) for group in groups]


def _path_around(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest cycle from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def test_specialize_has_no_import_cycles():
    graph = import_graph(SRC, "specialize")
    assert len(graph) > 40 and graph["specialize.cli"]  # the walk found the package and its imports
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checker_sees_function_level_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")  # function-level, relative, submodule
    (pkg / "sub" / "b.py").write_text("from .. import c\n")  # two levels up, a module named by `from`
    (pkg / "c.py").write_text("import pkg.a as a\nfrom pkg.sub import VALUE\n")  # a name of a package
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b", "pkg.sub"}, "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.a", "pkg.sub"}}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    # through a package's __init__: importing pkg.sub.b from outside runs pkg/sub/__init__.py
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg import c\n")
    (pkg / "d.py").write_text("def f():\n    from pkg.sub.b import x\n")
    (pkg / "c.py").write_text("import pkg.d\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.c", "pkg.d", "pkg.sub", "pkg.c"]]
