"""Writing files so that a crash never leaves one half-written: the one atomic write and JSONL writer.

A reader sees either the old file or the complete new one: the text goes into a temporary file
in the same folder (same file system), is flushed to disk, and replaces the target in one
`os.replace`. Every JSONL file specialize writes (datasets, predictions, metrics) goes through
`jsonl_line`, so they all use the same encoding: UTF-8, non-ASCII kept, one object per `\\n`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def jsonl_line(row: Any) -> str:
    """One JSONL row: compact JSON with non-ASCII text kept, ending in `\\n`.

    JSON escapes raw line breaks inside strings, so a row never spans lines (U+2028 and U+0085
    are left as they are; readers split at `\\n` only).
    """
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` in one step; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; ours are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """Indented JSON, written atomically (summaries, scorecards, manifests)."""
    return write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Rows as JSONL, written atomically: `path` is the old file or the complete new one."""
    return write_atomic(path, "".join(jsonl_line(row) for row in rows))


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one row (logs such as metrics.jsonl, where each row is complete on its own)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(row))


def write_dir_atomic(path: str | Path, fill: Callable[[Path], None],
                     is_complete: Callable[[Path], bool] | None = None) -> Path:
    """Make folder `path` by `fill(tmp)` in a new temporary sibling, then swap it in by renaming.

    A crash while filling leaves the old folder (or none), never a half-written `path` that
    looks complete; the temporary folder is removed whatever happens. An old `path` is moved
    aside first and deleted. When another process renamed its own build into place in the
    meantime, that one is kept if `is_complete` says it is whole (caches built concurrently).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process put its own build there first
            if is_complete is None or not is_complete(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
