"""Reading the documentation of the installed standard library, in a fresh interpreter.

`read_library(names)` imports each module in a child process (the caller may have imported
libraries that patch the standard library) and returns every module's docstring and every
documented public function, class and method as an `Entry`, with reST markup unwrapped and
run-dependent text (addresses, some defaults) made stable. `specialize.examples.pydocs` turns
them into the embedded default data set.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specialize.errors import UserError

if TYPE_CHECKING:
    from rich.progress import Progress

# Left out of `sys.stdlib_module_names`: side effects on import (antigravity opens a browser, this
# prints, readline/rlcompleter take over the terminal), GUI and IDE packages, test helpers, modules
# deprecated or removed by 3.13 (PEP 594 and friends), and platform twins documented via os/os.path.
SKIP_MODULES = frozenset("""
    antigravity this readline rlcompleter idlelib tkinter turtle turtledemo pydoc_data ensurepip
    lib2to3 distutils imp asynchat asyncore smtpd aifc audioop cgi cgitb chunk crypt imghdr mailcap
    msilib nis nntplib ossaudiodev pipes sndhdr spwd sunau telnetlib uu xdrlib sre_compile sre_parse
    sre_constants posix nt msvcrt winreg winsound posixpath ntpath genericpath nturl2path encodings
""".split())
# Submodules that people look up by their dotted name (packages themselves come from the list above).
SUBMODULES = (
    "collections.abc", "concurrent.futures", "email.message", "email.parser", "email.utils",
    "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server", "importlib.abc",
    "importlib.machinery", "importlib.metadata", "importlib.resources", "importlib.util",
    "logging.config", "logging.handlers", "multiprocessing.pool", "multiprocessing.shared_memory",
    "os.path", "unittest.mock", "urllib.error", "urllib.parse", "urllib.request",
    "urllib.robotparser", "wsgiref.simple_server", "wsgiref.util", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server",
)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # `<object at 0x7f...>` differs between runs
_ROLE = re.compile(r":[\w:.-]+:`~?([^`]+)`")  # reST `:func:`name`` -> name
_LITERAL = re.compile(r"``([^`]+)``")  # reST ``code`` -> code
_READING = "pydocs-reading:"  # progress lines from the child that reads the library


@dataclass(frozen=True)
class Entry:
    """A documented object as it appears in the corpus."""

    id: str
    module: str
    name: str
    kind: str
    signature: str
    doc: str


def stdlib_modules() -> list[str]:
    """The modules pydocs documents (before import failures are dropped), sorted."""
    names = {n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES}
    return sorted(names | set(SUBMODULES))


def _import(name: str) -> Any | None:
    # Deprecation warnings and stray prints must not reach the user's terminal or the progress bar.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # missing C extension, wrong platform, ...: the module is simply left out
            return None


def clean_doc(doc: str | None) -> str:
    """A docstring as plain text: dedented, reST roles and literals unwrapped, addresses removed."""
    if not isinstance(doc, str):
        return ""
    text = re.sub(".\b", "", inspect.cleandoc(doc))  # pydoc-style backspace bold, just in case
    text = _ADDRESS.sub("", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text)))
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


class _Shown:
    """A parameter default shown as fixed text instead of its (possibly run-dependent) repr."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _default_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if value is None or isinstance(value, (bool, int, float, complex)):
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value) if len(repr(value)) <= 40 else "..."
    if isinstance(value, (tuple, list, dict, set, frozenset)) and not value:
        return repr(value)
    if isinstance(value, tuple) and len(value) <= 4:
        items = [_default_text(v) for v in value]
        return "..." if "..." in items else f"({', '.join(items)}{',' if len(items) == 1 else ''})"
    if inspect.isclass(value) or inspect.isroutine(value):
        return getattr(value, "__qualname__", "...")
    return "..."  # sys.stdout, os.environ, sentinels: their reprs vary between runs


def signature(obj: Any) -> str:
    try:
        sig = inspect.signature(obj)
        params = [p if p.default is p.empty else p.replace(default=_Shown(_default_text(p.default)))
                  for p in sig.parameters.values()]
        return _ADDRESS.sub("", str(sig.replace(parameters=params)))
    except Exception:  # many C callables have no introspectable signature
        return "(...)"


def _from_stdlib(obj: Any) -> bool:
    """False for functions that other packages patched into the standard library."""
    home = getattr(obj, "__module__", None)
    return not isinstance(home, str) or home.partition(".")[0] in sys.stdlib_module_names


def _module_members(mod: Any) -> list[tuple[str, Any]]:
    """Public functions and classes a module defines or lists in __all__, sorted by name."""
    exported = getattr(mod, "__all__", None)
    exported = set(exported) if isinstance(exported, (list, tuple)) else set()
    members = []
    for name in sorted(exported or dir(mod)):
        obj = getattr(mod, name, None) if isinstance(name, str) and not name.startswith("_") else None
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _from_stdlib(obj):
            continue
        if getattr(obj, "__module__", None) == mod.__name__ or name in exported:
            members.append((name, obj))
    return members


def _methods(cls: type) -> list[tuple[str, Any]]:
    """Public methods a class defines itself (inherited ones are documented with their class)."""
    methods = []
    for name, attr in sorted(vars(cls).items()):
        if isinstance(attr, (classmethod, staticmethod)):
            attr = attr.__func__
        if not name.startswith("_") and inspect.isroutine(attr) and _from_stdlib(attr):
            methods.append((name, attr))
    return methods


def _collect(modules: dict[str, Any]) -> list[Entry]:
    """Every documented public function, class and method, each under one module only."""
    # An object exported by several modules (io.open is builtins.open) is documented once: by the
    # module that defines it, else by its own name, else by the shortest module name.
    owner: dict[int, tuple] = {}
    for display, mod in modules.items():
        for name, obj in _module_members(mod):
            rank = (getattr(obj, "__module__", None) != mod.__name__,
                    name != getattr(obj, "__name__", name), len(display), display, name)
            if id(obj) not in owner or rank < owner[id(obj)][0]:
                owner[id(obj)] = (rank, display, name, obj)
    entries = []
    for _, module, name, obj in owner.values():
        kind = "class" if inspect.isclass(obj) else "function"
        entries.append(Entry(f"{module}.{name}", module, name, kind, signature(obj),
                              clean_doc(obj.__doc__)))
        if kind == "class":
            for method_name, method in _methods(obj):
                entries.append(Entry(f"{module}.{name}.{method_name}", module,
                                      f"{name}.{method_name}", "method", signature(method),
                                      clean_doc(method.__doc__)))
    return sorted((e for e in entries if e.doc), key=lambda e: e.id)


def render_module(module: str, doc: str, entries: list[Entry]) -> str:
    """One corpus file: the module docstring, then each entry's signature with its docstring."""
    parts = [f"{module}\n{'=' * len(module)}\n"]
    if doc:
        parts.append(doc + "\n")
    for e in entries:  # sorted by id, so a class's methods follow the class
        head = f"class {e.id}{e.signature}" if e.kind == "class" else f"{e.id}{e.signature}"
        body = "\n".join("    " + line if line else "" for line in e.doc.splitlines())
        parts.append(f"{head}\n{body}\n")
    return "\n".join(parts)


def read_library(names: list[str], strict: bool, bar: Progress,
                  task: Any) -> tuple[dict[str, str], list[Entry]]:
    """Import each module and read its docs: (module -> cleaned docstring, documented entries).

    This runs in a fresh interpreter: the calling process may have imported libraries that patch
    the standard library (pytest replaces pdb.set_trace, transformers adds logging.Logger methods),
    and those must not leak into the data. A fresh interpreter also keeps docstrings under -OO.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONOPTIMIZE", "PYTHONINSPECT")}
    package_root = str(Path(__file__).resolve().parents[2])  # src/ or site-packages/
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="specialize-pydocs-") as tmp:
        result, errors = Path(tmp) / "library.json", Path(tmp) / "stderr.txt"
        command = [sys.executable, "-m", "specialize.examples.stdlib_docs", "--read", str(result), *names]
        with open(errors, "w") as stderr, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                           stderr=stderr, text=True) as child:
            for line in child.stdout:  # one line per module, for the progress bar
                if line.startswith(_READING):
                    bar.update(task, advance=1, description=f"pydocs: reading {line[len(_READING):].strip()}")
        if child.returncode != 0:
            raise RuntimeError(f"reading the standard library failed:\n{errors.read_text()[-2000:]}")
        library = json.loads(result.read_text(encoding="utf-8"))
    if strict and library["failed"]:
        raise UserError(f"cannot import module '{library['failed'][0]}' for pydocs")
    return library["docs"], [Entry(**e) for e in library["entries"]]


def _read_in_child(result: Path, names: list[str]) -> None:
    """The child side of `read_library`: writes {docs, entries, failed} as JSON to `result`."""
    imported, failed = {}, []
    for name in names:
        print(_READING + name, flush=True)
        mod = _import(name)
        if mod is None:
            failed.append(name)
        else:
            imported[name] = mod
    library = {"docs": {name: clean_doc(mod.__doc__) for name, mod in imported.items()},
               "entries": [asdict(e) for e in _collect(imported)], "failed": failed}
    result.write_text(json.dumps(library), encoding="utf-8")


if __name__ == "__main__" and sys.argv[1:2] == ["--read"]:  # the fresh interpreter of `read_library`
    _read_in_child(Path(sys.argv[2]), sys.argv[3:])
