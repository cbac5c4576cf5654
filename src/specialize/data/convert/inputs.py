"""Finding the files to convert and telling what kind of input each is (reading: `data.io.read_text`).

Kind detection when `kind` is `auto`:
- a folder or .zip holding `users.json` and `channels.json` is a Slack export;
- a .csv file is a chat transcript (it must have the conversation column);
- a .jsonl file whose first row has `messages` is a chat file;
- .html/.htm/.md/.markdown/.txt/.rst files are FAQ pages (pages without questions go to the
  generator when one is set, see `convert`).
Folders are searched recursively (hidden files and the output file itself are skipped). A link
inside a folder is followed only when it stays inside that folder: a link to a file elsewhere
would put that file into the dataset (and, with a generator, send it to the endpoint), so it is
skipped and named in the summary. Files named on the command line are read as given.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from specialize.config import ConvertConfig
from specialize.data.io import read_text
from specialize.errors import UserError

PAGE_SUFFIXES = {".html", ".htm", ".xhtml", ".md", ".markdown", ".mdown", ".mkd", ".txt", ".text", ".rst"}
CHAT_SUFFIXES = {".csv", ".jsonl"}


def leads_out(path: Path, folder: Path) -> bool:
    """True when `path` (inside `folder`, or a link there) resolves to somewhere outside `folder`."""
    return not path.resolve().is_relative_to(folder.resolve())


@dataclass
class Input:
    """One thing to convert: a page, a chat file, or a whole Slack export (folder or zip)."""

    path: Path
    display: str  # how the path is written in sources and the summary
    kind: str  # faq | docs | chat | slack


def _display(path: Path) -> str:
    return path.as_posix()


def is_slack_export(path: Path) -> bool:
    """True for a folder or zip that holds a Slack workspace export."""
    if path.is_dir():
        return (path / "users.json").is_file() and (path / "channels.json").is_file()
    if path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = {Path(n).name for n in archive.namelist() if n.count("/") <= 1}
        return {"users.json", "channels.json"} <= names
    return False


def find_inputs(cfg: ConvertConfig, skip: set[Path]) -> tuple[list[Input], list[str]]:
    """Expand `cfg.inputs` into files (or Slack exports) with their kinds.

    Args:
        cfg: the convert config.
        skip: resolved paths never to read (the output and the generator cache).

    Returns:
        the inputs, and the links inside input folders that were not followed (they lead out).
    """
    if not cfg.inputs:
        raise UserError("nothing to convert: give one or more files or folders as inputs")
    found: list[Input] = []
    links_out: list[str] = []
    for raw in cfg.inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError("no such file or folder", path=raw)
        if cfg.kind in ("auto", "slack") and is_slack_export(path):
            found.append(Input(path, _display(path), "slack"))
        elif cfg.kind == "slack":
            raise UserError("not a Slack export (a folder or .zip with users.json and channels.json)", path=raw)
        elif path.is_dir():
            files = [f for f in sorted(path.rglob("*")) if f.is_file() and f.resolve() not in skip
                     and not any(part.startswith(".") for part in f.relative_to(path).parts)]
            links_out += [_display(f) for f in files if leads_out(f, path)]
            files = [f for f in files if not leads_out(f, path)]
            kinds = [(f, _kind_in_folder(f, cfg)) for f in files]
            kept = [Input(f, _display(f), kind) for f, kind in kinds if kind is not None]
            if not kept:
                wanted = ", ".join(sorted(CHAT_SUFFIXES if cfg.kind == "chat" else PAGE_SUFFIXES | CHAT_SUFFIXES))
                raise UserError(f"no files to convert in this folder (looked for {wanted})", path=raw)
            found.extend(kept)
        else:
            found.append(Input(path, _display(path), _file_kind(path, cfg)))
    # A file named twice (itself and through its folder) is converted once.
    unique: dict[Path, Input] = {}
    for item in found:
        unique.setdefault(item.path.resolve(), item)
    return list(unique.values()), links_out


def _kind_in_folder(path: Path, cfg: ConvertConfig) -> str | None:
    suffix = path.suffix.lower()
    if suffix in PAGE_SUFFIXES and cfg.kind in ("auto", "faq", "docs"):
        return "faq" if cfg.kind == "auto" else cfg.kind
    if suffix in CHAT_SUFFIXES and cfg.kind in ("auto", "chat"):
        return _file_kind(path, cfg)
    return None  # images, stylesheets and the like next to saved pages


def _file_kind(path: Path, cfg: ConvertConfig) -> str:
    suffix = path.suffix.lower()
    if cfg.kind in ("faq", "docs"):
        if suffix in CHAT_SUFFIXES:
            raise UserError(f"a {suffix} file is not a {cfg.kind} page; use kind chat (or auto)", path=path)
        return cfg.kind  # any other text file is read as a page
    if suffix == ".csv":
        return "chat"
    if suffix == ".jsonl":
        first = next((line for line in read_text(path).splitlines() if line.strip()), "")
        try:
            row = json.loads(first)
        except ValueError as e:
            raise UserError(f"not valid JSON: {e}", path=path, line=1) from None
        if not isinstance(row, dict) or "messages" not in row:
            raise UserError("JSONL rows without a 'messages' list are not chats; Q&A JSONL can be "
                            "used for training as it is", path=path, line=1, field="messages")
        return "chat"
    if cfg.kind == "chat":
        raise UserError("chat transcripts must be .csv or .jsonl files", path=path)
    if suffix in PAGE_SUFFIXES:
        return "faq"
    raise UserError(f"cannot tell what kind of input a '{suffix or 'suffix-less'}' file is; "
                    "pass kind faq, docs, chat or slack", path=path)
